"""lightning-fuse against its peers (the optional `peers` extra: TRL, mergekit); skipped when they are missing."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import domain_text, tiny_llama, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
_PEERS = 'pip install -e ".[peers]"'


def test_dense_loss_equals_trl_gkd_on_a_fixed_batch(tmp_path):
    """N = 1, ``distill_top_k`` = V, ``clm_weight`` 0: our loss is TRL GKD's (off-policy, beta 0 = forward KL) on
    the same batch, prompt tokens and left padding masked by TRL's own collator."""
    pytest.importorskip("trl", reason=f"TRL is not installed ({_PEERS})")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from lightning_fuse import FusionModule, SourceSpec

    tok = train_tokenizer([domain_text("words", 200, 0), domain_text("sums", 200, 0)], vocab_size=300)
    student, teacher = tiny_llama(len(tok), seed=1), tiny_llama(len(tok), hidden=48, seed=2)
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)

    text = domain_text("words", 40, 3) + domain_text("sums", 40, 3)
    ids = tok(text)["input_ids"]
    lengths, prompts = [40, 33, 27, 40], [3, 1, 5, 2]  # ragged: the collator left-pads
    rows, start = [], 0
    for n in lengths:
        rows.append(ids[start : start + n])
        start += n
    data = Dataset.from_dict({"prompt": ["x"] * len(rows), "input_ids": rows,
                              "completion_mask": [[0] * p + [1] * (len(r) - p) for r, p in zip(rows, prompts)]})
    args = GKDConfig(output_dir=str(tmp_path / "trl"), lmbda=0.0, beta=0.0, seq_kd=False, report_to="none",
                     use_cpu=True, gradient_checkpointing=False, max_length=64, per_device_train_batch_size=4)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([data[i] for i in range(len(rows))])
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).sum() > sum(prompts)  # padded
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, dict(batch)))
        # float64 reference: mean over positions with a gold next token of KL(teacher || student)
        s_lp = torch.log_softmax(student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double(), -1)
        t_lp = torch.log_softmax(teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double(), -1)
        kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)[:, :-1]
        reference = float(kl[batch["labels"][:, 1:] != -100].mean())

    def loss(top_k: int) -> float:
        module = FusionModule(str(tmp_path / "student"), [SourceSpec("teacher", str(tmp_path / "teacher"),
                              load_in_8bit=False)], strategy="uniform", clm_weight=0.0, distill_top_k=top_k,
                              alignment_cache_dir=None)
        module.configure_model()
        with torch.no_grad():
            return float(module._step({k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, "train")["loss"])

    assert theirs > 0
    dense = loss(len(tok))
    assert theirs == pytest.approx(reference, abs=1e-7)
    # 2e-6: dense mode computes the dense KL itself (lightning_fuse.dense, no "other" bucket); with its own models
    # and the same left padding it equals a float64 reference to 4e-8. Here 1.1e-6 is left: on this batch the
    # teacher object inside GKDTrainer gives logits up to 4e-3 away from the same weights loaded from its folder
    # (ours), for a reason we did not find
    assert dense == pytest.approx(reference, abs=2e-6)
    assert dense == pytest.approx(theirs, abs=2e-6)
    assert loss(5) < theirs  # top-k: a lower bound of the same divergence (support + "other" bucket)


@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None or importlib.util.find_spec("mergekit") is None,
    reason=f"the peers extra (TRL, mergekit) is not installed ({_PEERS})",
)
def test_peers_benchmark_fast_asserts_parity():
    """`benchmarks/peers.py --fast` runs every contender once and asserts parity (dense loss = GKD's, merges =
    mergekit's) — not speed."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--fast"], capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "parity ok" in out.stdout
    for contender in ("TRL GKD", "TRL GOLD", "mergekit run_merge", "FuseLLM-style full DTW"):
        assert contender in out.stdout
