"""FusionModule: frozen sources -> (alignment) -> selector -> weighted fusion -> distillation into the target.

Extension points for subclasses (each a small method): ``build_target``, ``build_sources``, ``build_selector``,
``run_sources`` (how source outputs are obtained), ``selector_features`` (what the selector sees),
``fusion_weights`` (how sources are weighted) and ``fuse_distributions`` (how they are mixed).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_fuse.alignment.aligner import AlignedBatch
from lightning_fuse.callbacks import SelectionFeedback
from lightning_fuse.dense import distill_terms
from lightning_fuse.fusion import (
    DISTILL_LOSSES,
    STRATEGIES,
    DistillLoss,
    SourceOutput,
    SparseDist,
    Strategy,
    baseline_weights,
    fuse,
    gold_next_tokens,
    mixture_nll,
    next_token_mask,
    sequence_ce,
)
from lightning_fuse.logits import plain_lm_head
from lightning_fuse.schedule import LR_SCHEDULES, LRSchedule, lr_factor
from lightning_fuse.selector import Selection, Selector, SelectorFeatures
from lightning_fuse.sources import (
    DType,
    FrozenSource,
    SourceSpec,
    load_causal_lm,
    load_config,
    load_tokenizer,
    resolve_path,
    tokenizer_fingerprint,
)
from lightning_fuse.student import StudentStats, chunked_argmax, student_stats
from lightning_fuse.token_fusion import (
    TOKEN_FEATURES,
    TokenFeatures,
    TokenGate,
    token_mixture_nll,
    token_selection,
)

log = logging.getLogger(__name__)


class FusionModule(pl.LightningModule):
    """Fuse N frozen source LMs into a trainable target LM.

    Total loss: ``clm_weight * CE(target, gold) + (1 - clm_weight) * D(P_fused || target)
    + selector loss + beta * feedback`` (``beta`` and the feedback term come from the ``SelectionFeedback``
    callback). The selector loss is the mixture likelihood of the gold tokens under the gate (it trains only the
    selector); the target distils the fused distribution with the fusion weights detached.

    Args:
        target: folder or hub id of the target causal LM (a folder with only a config starts from scratch).
        sources: the frozen source LMs (name, path, tokenizer, load_in_8bit, ...).
        tokenizer: the target's tokenizer; defaults to ``target``.
        strategy: ``adaptive`` (trained selector), ``uniform``, ``min_ce`` / ``avg_ce`` (FuseLLM's MinCE and AvgCE,
            ``softmax(exp(-CE))``), ``softmax_ce`` (``softmax(-CE)``, sharper; not FuseLLM's), ``clm`` (no
            distillation).
        top_k: sources kept per sequence by the adaptive selector.
        threshold: keep the sources whose gate is >= threshold instead of the top-K (in (0, 1]).
        relative_threshold: drop a kept source whose gate is below this share of the row's best gate (in (0, 1];
            None = off): a source much worse than the best never gets a large weight (``Selector``).
        selector_features: what the selector sees: ``rewards`` (exp(-CE) of every source), ``hidden`` (pooled
            target hidden state) or ``both``.
        selector_width: hidden width of the selector MLP.
        selector_prior: start the selector from the sources' CE ranking (logits = MLP + s * (mean CE - CE_k), MLP
            output zero at init: gate softmax(-CE), softmax_ce's weights) so its first choices are min_ce's; False = a plain randomly initialised MLP.
            Used whenever the selector sees rewards (``selector_features`` rewards or both).
        clm_weight: lambda, weight of the causal-LM loss on gold tokens, in [0, 1].
        distill_loss: divergence D: ``forward_kl`` (soft-target CE), ``reverse_kl`` or ``jsd``.
        temperature: distillation temperature T > 0.
        distill_top_k: ids kept per position of each source's distribution.
        target_dtype: dtype of the target's weights (use Trainer ``precision`` for mixed precision).
        learning_rate: AdamW learning rate of the target.
        selector_learning_rate: AdamW learning rate of the selector.
        weight_decay: AdamW weight decay of the target.
        warmup_steps: linear learning-rate warm-up steps.
        lr_schedule: after the warm-up, ``constant`` or ``cosine`` (decay to ``lr_floor`` x the peak at the
            trainer's last step, ``max_steps`` or its estimate; ``lightning_fuse.schedule``). Gradient clipping is
            Lightning's own: ``--trainer.gradient_clip_val 1.0`` (clips the target's, the selector's and the token
            gate's gradients together).
        lr_floor: the cosine schedule's final share of the peak learning rate, in [0, 1].
        on_nonfinite: what a NaN/inf loss does: ``stop`` (raise, naming the step and the part) or ``skip_batch``.
        offline: read the sources' top-k outputs from the batch (``batch["cached"]``, see ``lightning-fuse
            precompute``) instead of loading and running the sources.
        routing: ``after_sources`` runs every source, then selects (the selector may use their rewards);
            ``before_sources`` selects from the target's hidden states first and runs each source only on the
            sequences that kept it, so the cost grows with K, not N (needs ``selector_features: hidden``).
        explore: with ``before_sources``, the share of training sequences that also run one random unselected
            source, so the selector can compare sources it did not pick (its learning signal; not distilled).
        selector_warmup_steps: for the first training steps, every source runs (also with ``before_sources``) and
            the target distils the sources ranked by CE (the top-K of softmax(-CE), renormalised: min_ce's choice
            with K = 1) while the selector learns from the mixture likelihood over all of them; then the selector
            decides. For selectors without the CE prior (``hidden`` features, ``selector_prior: false``), whose
            untrained early choices would otherwise be distilled.
        alignment_cache_dir: where vocabulary maps between a source's and the target's tokenizers are cached
            (built once per tokenizer pair); None = no cache. Same-tokenizer sources skip alignment entirely.
        trust_remote_code: allow code shipped with the target/tokenizer.
        selection: ``sequence`` weights the sources per sequence; ``token`` (METHOD.md §8,
            ``lightning_fuse.token_fusion``) keeps the per-sequence choice of which sources run on a row (top-K /
            threshold; routed mode still runs only those) and mixes the kept sources at every position: ``adaptive``
            with a trained per-position gate (``token_features``), ``min_ce`` / ``avg_ce`` / ``softmax_ce`` /
            ``uniform`` with their per-token forms over all sources (token-level MinCE: the source with the largest
            gold log-prob at each position).
        token_features: what the per-token gate sees at each position: ``hidden`` (the target's detached hidden
            state), ``signals`` (the kept sources' gold log-prob, top-1 log-prob and top-k mass; with the gold
            log-prob prior, a soft token-level MinCE at init) or ``both``.
        token_width: hidden width of the per-token gate's MLP.
        token_window: token-level MinCE: average the gold log-probs over a centred window of this many positions
            before taking the argmax (1 = none).
        gradient_checkpointing: recompute the target's decoder layers in the backward pass instead of keeping their
            activations (the HF model's own switch, non-reentrant): less memory, about one more forward pass of
            compute; losses and gradients are unchanged.
    """

    def __init__(
        self,
        target: str,
        sources: list[SourceSpec] | None = None,
        tokenizer: str | None = None,
        strategy: Strategy = "adaptive",
        top_k: int = 1,
        threshold: float | None = None,
        relative_threshold: float | None = None,
        selector_features: SelectorFeatures = "both",
        selector_width: int = 64,
        selector_prior: bool = True,
        clm_weight: float = 0.5,
        distill_loss: DistillLoss = "forward_kl",
        temperature: float = 1.0,
        distill_top_k: int = 10,
        target_dtype: DType = "float32",
        learning_rate: float = 1e-3,
        selector_learning_rate: float = 1e-2,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
        lr_floor: float = 0.1,
        on_nonfinite: Literal["stop", "skip_batch"] = "stop",
        offline: bool = False,
        routing: Literal["after_sources", "before_sources"] = "after_sources",
        alignment_cache_dir: str | None = "~/.cache/lightning_fuse/vocab_maps",
        explore: float = 0.1,
        selector_warmup_steps: int = 0,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        selection: Literal["sequence", "token"] = "sequence",
        token_features: TokenFeatures = "both",
        token_width: int = 64,
        token_window: int = 1,
    ) -> None:
        super().__init__()
        specs = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in (sources or [])]
        _validate(specs, strategy, top_k, threshold, clm_weight, distill_loss, temperature, distill_top_k, on_nonfinite,
                  target=target, tokenizer=tokenizer, learning_rates=(learning_rate, selector_learning_rate))
        _validate_routing(routing, strategy, selector_features, explore, selector_warmup_steps)
        _validate_token(selection, strategy, token_features, token_width, token_window)
        if lr_schedule not in LR_SCHEDULES or not 0.0 <= lr_floor <= 1.0:
            raise ValueError(f"`--model.lr_schedule` can be {', '.join(LR_SCHEDULES)} (got {lr_schedule!r}) and "
                             f"`--model.lr_floor` must be in [0, 1] (got {lr_floor}).")
        self.save_hyperparameters(ignore=["sources"])
        self.hparams["sources"] = [asdict(s) for s in specs]  # plain dicts: checkpoints need no pickled classes
        self.source_specs = specs
        self.source_names = [s.name for s in specs]
        self.tokenizer = load_tokenizer(tokenizer or target, "target tokenizer", trust_remote_code)
        self.target_config = load_config(target, "target", trust_remote_code)
        self.target: nn.Module | None = None
        self.selector: Selector | None = None
        self.token_gate: TokenGate | None = None  # per-token selection with the adaptive strategy
        self.sources: list[FrozenSource] = []  # plain list: not a submodule, never in state_dict/optimizer
        self.load_sources = not offline  # export and evaluation of the target alone set this to False

    # ----------------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load the target and the selector (idempotent), then the sources on this process' device."""
        if self.target is None:
            from lightning_fuse.fsdp_load import fsdp_mesh, load_target_sharded

            if (mesh := fsdp_mesh(self)) is not None and type(self).build_target is FusionModule.build_target:
                self.target = load_target_sharded(self, mesh).train()  # meta init, rank 0 sends the weights
            else:  # a subclass' build_target loads fully on every rank (sharded below)
                self.target = self.build_target().train()  # from_pretrained returns eval mode
            if self.tokenizer is not None and self.target.get_input_embeddings().num_embeddings < len(self.tokenizer):
                raise ValueError(
                    f"The target's embedding has {self.target.get_input_embeddings().num_embeddings} rows but its "
                    f"tokenizer has {len(self.tokenizer)} tokens. Use the tokenizer the target was trained with."
                )
        if self.selector is None and self.sources_needed and self.hparams.strategy == "adaptive":
            self.selector = self.build_selector()
        if self.token_gate is None and self.sources_needed and self.per_token and self.hparams.strategy == "adaptive":
            self.token_gate = self.build_token_gate()
        if self.load_sources and self.sources_needed and not self.sources:
            self.sources = self.build_sources()
        self._shard()

    def _shard(self) -> None:
        """FSDP2 under ``ModelParallelStrategy``: the target's layers, the target, the selector (not the sources)."""
        from lightning_fuse.fsdp_load import shard_fusion

        self._sharded = getattr(self, "_sharded", False) or shard_fusion(self)

    @property
    def sources_needed(self) -> bool:
        return len(self.source_specs) > 0

    def build_target(self) -> nn.Module:
        h = self.hparams
        return self._prepare_target(load_causal_lm(h.target, "target", h.target_dtype,
                                                   trust_remote_code=h.trust_remote_code))

    def _prepare_target(self, model: nn.Module) -> nn.Module:
        h = self.hparams
        if h.get("gradient_checkpointing", False):  # .get: checkpoints saved before the option existed
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(
                    f"The target ({type(model).__name__}) does not support gradient checkpointing. "
                    "Set `--model.gradient_checkpointing false`."
                )
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name is deprecated)
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def build_selector(self) -> Selector:
        h = self.hparams
        hidden = getattr(self.target_config, "hidden_size", None) or self.target.get_input_embeddings().embedding_dim
        return Selector(len(self.source_specs), hidden, h.selector_features, h.selector_width, h.top_k, h.threshold,
                        prior=h.selector_prior, relative_threshold=h.get("relative_threshold"))

    @property
    def per_token(self) -> bool:
        return self.hparams.get("selection", "sequence") == "token"  # .get: checkpoints from before the option

    def build_token_gate(self) -> TokenGate:
        h = self.hparams
        hidden = getattr(self.target_config, "hidden_size", None) or self.target.get_input_embeddings().embedding_dim
        return TokenGate(len(self.source_specs), hidden, h.token_features, h.token_width)

    def build_sources(self) -> list[FrozenSource]:
        """Load every declared source, check its vocabulary against the target's and freeze it."""
        device = self._load_device()
        target_fp = tokenizer_fingerprint(self.tokenizer)
        sources = []
        for spec in self.source_specs:
            source = FrozenSource.load(spec, device)
            model_vocab = source.model.get_output_embeddings().weight.shape[0]
            if model_vocab < len(source.tokenizer):
                raise ValueError(
                    f"Source {spec.name!r}: its tokenizer has {len(source.tokenizer)} tokens but the model's vocabulary "
                    f"has {model_vocab}: they do not belong together. Set `tokenizer` to the model's own tokenizer."
                )
            if tokenizer_fingerprint(source.tokenizer) != target_fp:
                source.attach_aligner(self.tokenizer, self.hparams.alignment_cache_dir)
            sources.append(source)
        return sources

    def _load_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self._trainer is not None else self.device

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume with this module's settings (the user's config), refusing those that cannot change.

        The target, its tokenizer, the strategy and the selector's shape (features, width, prior) must be the
        checkpoint's; the checkpoint's sources must come first, in the same order (name and path). Sources may be
        appended: the selector grows, the old sources keep their learned scores, each new one starts neutral (the
        mean of the old output rows), and the selector's optimizer state restarts (the target's is kept). Learning
        rates come from this module's settings (the warm-up's progress is kept); every changed setting is logged.
        """
        saved = checkpoint.get("hyper_parameters") or {}
        old_specs = [  # LightningCLI may have turned the saved dicts into Namespace(class_path, init_args)
            dict(s if isinstance(s, dict) else (s.get("init_args") or s)) for s in saved.get("sources", [])
        ]
        old_names = [s["name"] for s in old_specs]
        if saved:
            self._check_resume(saved, old_specs)
            self._resume_learning_rates(checkpoint, saved)
        state = checkpoint.get("state_dict", {})
        if "selector.mlp.2.weight" not in state or self.selector is None or old_names == self.source_names:
            return
        if self.token_gate is not None:
            raise ValueError(
                "sources cannot be added on resume with `--model.selection token` (the per-token gate has one output "
                "per source): resume with the checkpoint's sources, or start a new fit without --ckpt_path."
            )
        h = self.hparams
        old = Selector(len(old_names), self.target_config.hidden_size, h.selector_features, h.selector_width, 1,
                       prior=h.selector_prior)
        old.load_state_dict({k.removeprefix("selector."): v for k, v in state.items() if k.startswith("selector.")})
        old.grow(len(self.source_names))
        state.update({f"selector.{k}": v for k, v in old.state_dict().items()})
        selector_ids = {id(p) for p in self.selector.parameters()}
        params = [p for group in self._param_groups() for p in group["params"]]  # the optimizer's param order
        for opt in checkpoint.get("optimizer_states", []):
            for index, p in enumerate(params):
                if id(p) in selector_ids:
                    opt["state"].pop(index, None)
        log.info("selector grown from %d to %d sources (new: %s)", len(old_names), len(self.source_names),
                 self.source_names[len(old_names):])

    _FIXED_ON_RESUME = ("target", "tokenizer", "strategy", "selector_features", "selector_width", "selector_prior",
                        "selection", "token_features", "token_width")

    def _check_resume(self, saved: dict[str, Any], old_specs: list[dict[str, Any]]) -> None:
        """Refuse settings that cannot change on resume (naming each); log the ones that changed."""
        h = self.hparams
        problems = [
            f"{key} {saved[key]!r} (now {h.get(key)!r})"
            for key in self._FIXED_ON_RESUME
            if key in saved and not _same_setting(saved[key], h.get(key))
        ]
        now = [(s.name, s.path) for s in self.source_specs]
        before = [(s["name"], s["path"]) for s in old_specs]
        if len(now) < len(before) or any(
            a[0] != b[0] or not _same_setting(a[1], b[1]) for a, b in zip(now, before)
        ):
            problems.append(f"sources {[n for n, _ in before]} (now {[n for n, _ in now]}; paths must match too)")
        if problems:
            raise ValueError(
                "the checkpoint cannot resume with this config: it was trained with " + "; ".join(problems) + ". "
                "These cannot change on resume (to add sources, keep the old ones first and in the same order, "
                "and append the new ones): use the checkpoint's values, or start a new fit without --ckpt_path."
            )
        changed = {k: (saved[k], v) for k, v in h.items() if k in saved and k != "sources" and saved[k] != v}
        if len(now) != len(before):
            changed["sources"] = ([n for n, _ in before], [n for n, _ in now])
        if changed:
            log.info("resuming with settings changed since the checkpoint: %s",
                     ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))

    def _resume_learning_rates(self, checkpoint: dict[str, Any], saved: dict[str, Any]) -> None:
        """The checkpoint's optimizer and scheduler states carry the old learning rates: rescale them to this
        module's, keeping the scheduler's progress (lr / base lr)."""
        h = self.hparams
        new = {"learning_rate": h.learning_rate, "selector_learning_rate": h.selector_learning_rate}
        if all(saved.get(k, v) == v for k, v in new.items()):
            return
        bases = [h.learning_rate, h.selector_learning_rate]
        for opt in checkpoint.get("optimizer_states", []):
            for group, base in zip(opt.get("param_groups", []), bases):
                old_base = group.get("initial_lr", group.get("lr"))
                if old_base:
                    group["lr"] = group["lr"] * base / old_base
                group["initial_lr"] = base
        for sched in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in sched:
                sched["base_lrs"] = bases[: len(sched["base_lrs"])]

    # ----------------------------------------------------------------------------------------------- steps
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        return self.target(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def run_sources(self, batch: dict[str, Tensor], rows: Tensor | None = None) -> list[SourceOutput]:
        """Each source's sparse output on this batch (frozen, no grad), from the sources or from the offline cache.

        ``rows`` (``[B, N]`` bool) runs source k only on the sequences with ``rows[:, k]`` (routed mode); the
        other rows get an empty distribution, gold log-prob -inf and CE NaN. An offline batch carries ``batch["cached"][name]`` = ``{"ids": [B, L, k], "logprobs": [B, L, k],
        "gold_logprob": [B, L], "ce": [B]}`` for every source.
        """
        if "cached" in batch:
            return [self._cached_output(batch["cached"], name) for name in self.source_names]
        if self.hparams.offline:
            raise ValueError("`--model.offline true` needs batches with cached source outputs: use the cache DataModule.")
        vocab = self.target.get_output_embeddings().weight.shape[0]
        k = self.hparams.distill_top_k
        outputs = []
        for i, source in enumerate(self.sources):
            source.to(self.device)
            idx = None if rows is None else rows[:, i].nonzero().squeeze(-1)
            aligned = (batch.get("aligned") or {}).get(source.name)  # computed by the DataLoader (AlignCollate)
            if idx is None or idx.numel() == rows.shape[0]:
                out = source.forward(batch["input_ids"], batch["attention_mask"], batch["labels"], k, vocab, aligned)
            else:
                sub = None
                if idx.numel() > 0:
                    part = None if aligned is None else AlignedBatch.from_dict(aligned).rows(idx)
                    sub = source.forward(batch["input_ids"][idx], batch["attention_mask"][idx], batch["labels"][idx], k,
                                         vocab, part)
                out = _scatter_rows(sub, idx, batch["input_ids"].shape, k)
            ran = slice(None) if idx is None else idx
            if not torch.isfinite(out.ce[ran]).all():
                self._nonfinite(f"source {source.name!r} produced NaN/inf log-probs")
            outputs.append(out)
        return outputs

    def _cached_output(self, cached: dict[str, dict[str, Tensor]], name: str) -> SourceOutput:
        if name not in cached:
            raise KeyError(f"The offline cache has no source {name!r} (it has {sorted(cached)}). Rerun precompute.")
        c = cached[name]
        out = SourceOutput(SparseDist(c["ids"].long(), c["logprobs"].float()), c["gold_logprob"].float(), c["ce"].float())
        if not torch.isfinite(out.ce).all():
            self._nonfinite(f"cached outputs of source {name!r} hold NaN/inf")
        return out

    @property
    def needs_hidden_states(self) -> bool:
        """Whether a step asks the target for its hidden states: only the adaptive selector reading them does."""
        h = self.hparams
        token_hidden = self.per_token and h.get("token_features") != "signals"
        return self.sources_needed and h.strategy == "adaptive" and (h.selector_features != "rewards" or token_hidden)

    def selector_features(
        self, outputs: list[SourceOutput], hidden: Tensor | None, attention_mask: Tensor
    ) -> dict[str, Tensor]:
        """Selector inputs: rewards exp(-CE_k) ``[B, N]`` and the mean-pooled, detached target hidden state ``[B, H]``.

        ``hidden`` is the target's last hidden state, or None when ``needs_hidden_states`` is False (then only the
        rewards are given; a subclass that reads hidden states overrides ``needs_hidden_states`` too).
        """
        features: dict[str, Tensor] = {}
        if hidden is not None:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            features["hidden"] = (hidden.detach() * m).sum(1) / m.sum(1).clamp_min(1)
        if outputs:  # routed: the sources have not run yet
            features["rewards"] = torch.exp(-torch.stack([o.ce for o in outputs], dim=-1))
        return features

    def _exploration(self, kept: Tensor) -> Tensor:
        """``[B, N]``: for a share ``explore`` of the rows, one random source that was not kept."""
        b, n = kept.shape
        if self.hparams.explore <= 0 or kept.all():
            return torch.zeros_like(kept)
        rows = torch.rand(b, device=kept.device) < self.hparams.explore
        scores = torch.rand(b, n, device=kept.device).masked_fill(kept, -1.0)
        pick = torch.zeros_like(kept).scatter_(-1, scores.argmax(-1, keepdim=True), True)
        return pick & rows.unsqueeze(-1) & ~kept

    def fusion_weights(self, outputs: list[SourceOutput], features: dict[str, Tensor]) -> Selection:
        """Per-sequence fusion weights; for fixed strategies the 'gate' is the weights themselves."""
        if self.hparams.strategy == "adaptive":
            return self.selector.select(self.selector(**features))
        if self.hparams.strategy == "clm":  # sources are evaluated (validation), never distilled: weight 0
            w = torch.zeros_like(torch.stack([o.ce for o in outputs], dim=-1))
            return Selection(w, w > 0, w)
        w = baseline_weights(self.hparams.strategy, torch.stack([o.ce for o in outputs], dim=-1))
        return Selection(w, w > 0, w)

    def fuse_distributions(self, outputs: list[SourceOutput], weights: Tensor) -> SparseDist:
        return fuse(outputs, weights)

    def _step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Any]:
        h = self.hparams
        labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
        batch = {**batch, "labels": labels}
        mask = next_token_mask(labels)
        gold = gold_next_tokens(labels)
        want_hidden = self.needs_hidden_states
        inputs, head, hidden = self._target_forward(batch, want_hidden)
        result: dict[str, Any] = {"mask": mask}
        if stage != "train":  # only evaluation reads the target's accuracy
            result["target_correct"] = (chunked_argmax(inputs.detach(), *head) == gold) & mask

        def finish_clm(stats: StudentStats) -> Tensor:
            target_logprob = (stats.picked[..., 0] - stats.log_z) * mask
            result["target_ce"] = sequence_ce(target_logprob.detach(), mask)
            result["clm"] = -target_logprob.sum() / mask.sum().clamp_min(1)
            return result["clm"]

        run_sources = self.sources_needed and (h.strategy != "clm" or stage != "train")
        if not run_sources:
            result["loss"] = finish_clm(student_stats(inputs, gold.unsqueeze(-1), head_weight=head[0], head_bias=head[1]))
            return result
        ran = None
        warmup = stage == "train" and h.strategy == "adaptive" and self.global_step < h.selector_warmup_steps
        if h.routing == "before_sources" and not warmup:  # decide first, then run only the kept sources (+ exploration)
            features = self.selector_features([], hidden, batch["attention_mask"])
            selection = self.fusion_weights([], features)
            ran = selection.mask | (self._exploration(selection.mask) if stage == "train" else False)
            outputs = self.run_sources(batch, ran)
        else:
            outputs = self.run_sources(batch)
            features = self.selector_features(outputs, hidden, batch["attention_mask"])
            selection = self.fusion_weights(outputs, features)
        result.update(source_ce=torch.stack([o.ce for o in outputs], -1), selection=selection, outputs=outputs)
        if h.strategy == "clm":
            result["loss"] = finish_clm(student_stats(inputs, gold.unsqueeze(-1), head_weight=head[0], head_bias=head[1]))
            return result
        if self.per_token:  # the per-sequence choice keeps the sources; a per-position gate / baseline mixes them
            selection = self.token_fusion_weights(selection, outputs, hidden, mask, ran)
            result["selection"] = selection
        weights = selection.weights if selection.token_weights is None else selection.token_weights
        if warmup:  # distil the CE ranking's top-K while the selector learns (it still gets its own loss below)
            weights = self.selector.select(-result["source_ce"].float()).weights
        stats, kd = distill_terms(outputs, weights.detach(), inputs, head, gold, mask, h.distill_loss, h.temperature,
                                  self.fuse_distributions, type(self).fuse_distributions is FusionModule.fuse_distributions)
        clm = finish_clm(stats)
        loss = h.clm_weight * clm + (1.0 - h.clm_weight) * kd
        result["kd"] = kd
        if h.strategy == "adaptive":
            gold_lp = torch.stack([o.gold_logprob for o in outputs], dim=1)
            result["selector_loss"] = mixture_nll(gold_lp, selection.gate, mask, available=ran)
            loss = loss + result["selector_loss"]
            gate, kept = selection.gate, selection.mask
            if selection.token_gate is not None:  # per-token: the gate's objective and shares are per position
                result["token_selector_loss"] = token_mixture_nll(gold_lp.transpose(1, 2), selection.token_gate, mask)
                loss = loss + result["token_selector_loss"]
                gate, kept = selection.token_gate[mask], selection.mask.unsqueeze(1).expand_as(selection.token_gate)[mask]
                result["token_stats"] = (gate, kept)
            feedback = self.feedback
            if feedback is not None and stage == "train" and feedback.beta > 0:
                result["feedback"] = feedback.loss(gate, kept)
                loss = loss + feedback.beta * result["feedback"]
        result["loss"] = loss
        return result

    def token_fusion_weights(
        self, selection: Selection, outputs: list[SourceOutput], hidden: Tensor | None, mask: Tensor, ran: Tensor | None
    ) -> Selection:
        """Per-token selection (``selection: token``): per-position weights over each row's kept sources."""
        return token_selection(self.hparams.strategy, selection, outputs, mask, self.token_gate, hidden, ran,
                               self.hparams.token_window)

    def _target_forward(self, batch: dict[str, Tensor], want_hidden: bool) -> tuple[Tensor, tuple, Tensor | None]:
        """``(inputs, (head_weight, head_bias), hidden)``: the target's last hidden state and its LM head, so that the
        losses apply the head one chunk of positions at a time (no ``[B, L, V]`` logits; ``lightning_fuse.student``);
        or, for a target whose logits are post-processed or that is FSDP-sharded, its logits and ``(None, None)``."""
        head = None if getattr(self, "_sharded", False) else plain_lm_head(self.target)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "output_hidden_states": want_hidden}
        out = self.target.base_model(**kwargs) if head is not None else self.target(**kwargs)
        hidden = out.hidden_states[-1] if want_hidden else None
        if head is None:
            return out.logits, (None, None), hidden
        return out[0], (head.weight, head.bias), hidden

    @property
    def feedback(self) -> SelectionFeedback | None:
        if self._trainer is None:
            return None
        return next((c for c in self.trainer.callbacks if isinstance(c, SelectionFeedback)), None)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any] | None:
        """One training step; NaN/inf in a source's output or in the loss follows ``on_nonfinite``.

        ``stop`` raises ``FloatingPointError`` naming the source or the loss parts, the step and the batch index.
        ``skip_batch`` on one process returns None (no backward, no optimizer update). Under DDP/FSDP the processes
        agree through an all-reduce of the fault flag, and all of them return a zero loss (zero gradients): the
        batch contributes nothing, but AdamW still applies its momentum and weight decay for that step.
        """
        self._fault_context = f"step {self.global_step}, batch {batch_idx}"
        try:
            r = self._step(batch, "train")
            parts = {k: r[k] for k in ("clm", "kd", "selector_loss", "token_selector_loss", "feedback") if k in r}
            fault = None
            for name, out in zip(self.source_names, r.get("outputs") or []):  # max: NaN or +inf if any (empty: -inf)
                lp = out.dist.logprobs if out.dist.dense else out.dist.logprobs.masked_fill(out.dist.ids < 0, -math.inf)
                if lp.numel() and not float(lp.max()) < math.inf:
                    fault = f"source {name!r} produced NaN/inf log-probs"
                    break
            if fault is None and not torch.isfinite(r["loss"]):
                bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items())
                fault = f"non-finite training loss at {self._fault_context} ({bad})"
            distributed = self.trainer.world_size > 1
            if distributed and self.hparams.on_nonfinite == "skip_batch":  # every process must take the same path
                flag = torch.tensor(0.0 if fault is None else 1.0, device=self.device)
                if float(self.trainer.strategy.reduce(flag, reduce_op="sum")) > 0 and fault is None:
                    fault = "NaN/inf on another process"
            if fault is not None:
                self._nonfinite(fault)  # raises with on_nonfinite=stop
                if not distributed:
                    return None
                zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
                return {"loss": zero}
            bs = batch["input_ids"].shape[0]
            self.log("train/loss", r["loss"], prog_bar=True, batch_size=bs)
            self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
            ret: dict[str, Any] = {"loss": r["loss"]}
            if "selection" in r:
                gate, kept = r.get("token_stats") or (r["selection"].gate, r["selection"].mask)
                ret.update(selection_gate=gate.detach(), selection_mask=kept.detach(),
                           selection_weights=r["selection"].weights.detach())
                if r["selection"].token_weights is not None:
                    ret["selection_token_weights"] = r["selection"].token_weights.detach()[r["mask"]]
            return ret
        finally:
            self._fault_context = None

    def on_before_optimizer_step(self, optimizer) -> None:
        """NaN/inf gradients with a finite loss (an overflowing backward) follow ``on_nonfinite`` too."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 AMP: the GradScaler already skips steps with inf gradients
        grads = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):  # one device sync
            return
        bad = next((n for n, g in grads if not torch.isfinite(g).all()), None)
        if bad is not None:
            self._nonfinite(f"non-finite gradient of {bad} at step {self.global_step}")
            optimizer.zero_grad(set_to_none=True)  # skip_batch: AdamW leaves parameters without gradient alone

    def configure_callbacks(self) -> list:
        """Checkpoints carry the RNG states, so that a resumed fit draws the same random numbers (``explore``)."""
        from lightning_fuse.checkpoint import RNGState, UntrainedGuard

        return [RNGState(), UntrainedGuard()]

    def _nonfinite(self, message: str) -> None:
        """Report NaN/inf (with the step and batch index during training): raise (``stop``) or warn once per batch."""
        context = getattr(self, "_fault_context", None)
        if context and context not in message:
            message = f"{message} at {context}"
        if self.hparams.on_nonfinite == "stop":
            fix = (
                "check that source (its weights; float16 can overflow: use bfloat16 or float32)"
                if message.startswith(("source", "cached"))
                else "lower the learning rate or check the data"
            )
            raise FloatingPointError(
                f"{message}. To fix: {fix}, or set `--model.on_nonfinite skip_batch` to skip such batches; "
                "resume from the last checkpoint (it holds the last finite state)."
            )
        if context is None or getattr(self, "_fault_reported", None) != context:
            log.warning("%s: batch skipped (on_nonfinite=skip_batch)", message)
            self._fault_reported = context
            self.skipped_batches = getattr(self, "skipped_batches", 0) + 1
            self.first_skip_reason = getattr(self, "first_skip_reason", None) or message
        return None

    # ----------------------------------------------------------------------------------------------- evaluation
    @property
    def max_seq_length(self) -> int | None:
        """The target's position limit (from its config; known before the weights load)."""
        return getattr(self.target_config, "max_position_embeddings", None)

    def _domains(self) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None)
        return list(getattr(dm, "domains", None) or ["default"])

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def _eval_start(self) -> None:
        names = ["target", *self.source_names]
        keys = [f"{d}|{n}|{m}" for d in self._domains() for n in names for m in ("ce", "acc")]
        keys += [f"{d}|{n}|{m}" for d in self._domains() for n in self.source_names for m in ("share", "routed")]
        self.eval_metrics = nn.ModuleDict({k: MeanMetric() for k in keys}).to(self.device)
        self.eval_loss = MeanMetric().to(self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    @torch.no_grad()
    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        r = self._step(batch, "val")
        domains = self._domains()
        tokens = r["mask"].sum(-1).float()
        self.eval_loss.update(r["clm"], weight=tokens.sum())
        for b in range(batch["input_ids"].shape[0]):
            d = domains[int(batch["domain"][b])]
            self.eval_metrics[f"{d}|target|ce"].update(r["target_ce"][b], weight=tokens[b])
            acc = r["target_correct"][b].sum() / tokens[b].clamp_min(1)
            self.eval_metrics[f"{d}|target|acc"].update(acc, weight=tokens[b])
            for i, name in enumerate(self.source_names if "source_ce" in r else []):
                self.eval_metrics[f"{d}|{name}|share"].update(r["selection"].weights[b, i])
                self.eval_metrics[f"{d}|{name}|routed"].update((r["selection"].weights[b].argmax() == i).float())
                if torch.isnan(r["source_ce"][b, i]):  # routed mode: this source did not run on this row
                    continue
                self.eval_metrics[f"{d}|{name}|ce"].update(r["source_ce"][b, i], weight=tokens[b])
                dist = r["outputs"][i].dist  # its most likely id (dense mode keeps the ids in vocabulary order)
                top1 = dist.ids[b].gather(-1, dist.logprobs[b].argmax(-1, keepdim=True)).squeeze(-1)
                top1 = top1 == batch["labels"][b].roll(-1)
                acc = (top1 & r["mask"][b]).sum() / tokens[b].clamp_min(1)
                self.eval_metrics[f"{d}|{name}|acc"].update(acc, weight=tokens[b])

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def _eval_end(self, stage: str) -> None:
        results = {}
        for key, metric in self.eval_metrics.items():
            if metric.update_count == 0 and not self.trainer.world_size > 1:
                continue
            domain, name, kind = key.split("|")
            value = float(metric.compute())
            if math.isnan(value):
                continue
            results[f"{stage}/{domain}/{name}_{kind}"] = value
            if kind == "ce":
                results[f"{stage}/{domain}/{name}_ppl"] = math.exp(min(value, 50.0))
        for source in self.sources:
            if source.aligner is not None:
                results[f"align/rate/{source.name}"] = source.alignment_rate
                results.update({f"align/mass_{k}/{source.name}": v for k, v in source.mass.shares().items()})
        self.log_dict(results, sync_dist=False)
        self.log(f"{stage}/loss", self.eval_loss.compute(), prog_bar=True)
        self.eval_results = results
        if self.trainer.state.fn != "fit" and self.trainer.is_global_zero:  # `lightning-fuse validate/test`
            from lightning_fuse.evaluation import format_table

            print(format_table(results, stage, routed=self.hparams.routing == "before_sources"))

    def on_fit_end(self) -> None:
        """End of ``fit``: print the last validation's per-domain table (what ``lightning-fuse validate`` prints)."""
        results = getattr(self, "eval_results", None)
        if results and self.trainer.is_global_zero and any(k.startswith("val/") for k in results):
            from lightning_fuse.evaluation import format_table

            routed = self.hparams.routing == "before_sources"
            print(f"last validation (step {self.global_step}):\n{format_table(results, 'val', routed=routed)}")

    # ----------------------------------------------------------------------------------------------- optimizer
    def _param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: the target's trainable parameters, then the selector's (never the sources')."""
        h = self.hparams
        target_params = [p for p in self.target.parameters() if p.requires_grad]
        groups = [{"params": target_params, "lr": h.learning_rate, "weight_decay": h.weight_decay}]
        if self.selector is not None and h.strategy == "adaptive":
            params = list(self.selector.parameters())
            if self.token_gate is not None:  # one group: on_load_checkpoint's optimizer-state bookkeeping stays as is
                params += list(self.token_gate.parameters())
            groups.append({"params": params, "lr": h.selector_learning_rate, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        h = self.hparams
        groups = self._param_groups()
        trainable = sum(p.numel() for g in groups for p in g["params"])
        frozen = sum(p.numel() for s in self.sources for p in s.model.parameters())
        log.info("trainable parameters: %s (target + selector); frozen source parameters: %s", f"{trainable:,}", f"{frozen:,}")
        optimizer = torch.optim.AdamW(groups)
        warmup = max(h.warmup_steps, 0)
        schedule, floor = h.get("lr_schedule", "constant"), h.get("lr_floor", 0.1)  # .get: older checkpoints
        total = None
        if schedule != "constant" and self._trainer is not None:
            total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, schedule, floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _same_setting(a: Any, b: Any) -> bool:
    """Equal settings; two spellings of the same local path (relative, ``~``, symlink) are equal too."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        pa, pb = resolve_path(a), resolve_path(b)
        try:
            return os.path.exists(pa) and os.path.exists(pb) and os.path.samefile(pa, pb)
        except OSError:
            return False
    return False


def _scatter_rows(sub: SourceOutput | None, idx: Tensor, shape: torch.Size, k: int) -> SourceOutput:
    """A full-batch SourceOutput from one computed on the rows ``idx``; other rows are empty (ids -1, CE NaN)."""
    b, length = shape
    device = idx.device
    ids = torch.full((b, length, k), -1, dtype=torch.long, device=device)
    logprobs = torch.full((b, length, k), float("-inf"), device=device)
    gold = torch.full((b, length), float("-inf"), device=device)
    ce = torch.full((b,), float("nan"), device=device)
    if sub is not None:
        kk = sub.dist.ids.shape[-1]
        ids[idx, :, :kk] = sub.dist.ids
        logprobs[idx, :, :kk] = sub.dist.logprobs
        gold[idx] = sub.gold_logprob
        ce[idx] = sub.ce
    return SourceOutput(SparseDist(ids, logprobs), gold, ce)


def _validate_token(selection: str, strategy: str, features: str, width: int, window: int) -> None:
    problems = []
    if selection not in ("sequence", "token"):
        problems.append(f"`--model.selection` can be sequence, token, got {selection!r}.")
    if selection == "token" and strategy == "clm":
        problems.append("`--model.selection token` needs a fusion strategy (not clm, which distils nothing).")
    if features not in TOKEN_FEATURES:
        problems.append(f"`--model.token_features` can be {', '.join(TOKEN_FEATURES)}, got {features!r}.")
    if width < 1:
        problems.append(f"`--model.token_width` must be >= 1, got {width}.")
    if window < 1:
        problems.append(f"`--model.token_window` must be >= 1 (1 = no smoothing), got {window}.")
    if problems:
        raise ValueError("\n".join(problems))


def _validate_routing(routing: str, strategy: str, features: str, explore: float, warmup_steps: int = 0) -> None:
    problems = []
    if routing not in ("after_sources", "before_sources"):
        problems.append(f"`--model.routing` can be after_sources, before_sources, got {routing!r}.")
    if routing == "before_sources" and strategy != "adaptive":
        problems.append(f"`--model.routing before_sources` needs `--model.strategy adaptive`, got {strategy!r}.")
    if routing == "before_sources" and features != "hidden":
        problems.append(
            "`--model.routing before_sources` decides before the sources run, so it cannot use their rewards: "
            f"set `--model.selector_features hidden` (got {features!r})."
        )
    if not 0.0 <= explore <= 1.0:
        problems.append(f"`--model.explore` must be between 0 and 1, got {explore}.")
    if warmup_steps < 0:
        problems.append(f"`--model.selector_warmup_steps` must be >= 0 (0 = no warm-up), got {warmup_steps}.")
    if problems:
        raise ValueError("\n".join(problems))


def _validate(
    specs: list[SourceSpec],
    strategy: str,
    top_k: int,
    threshold: float | None,
    clm_weight: float,
    kind: str,
    temperature: float,
    distill_top_k: int,
    on_nonfinite: str,
    target: str | None = None,
    tokenizer: str | None = None,
    learning_rates: tuple[float, float] = (1e-3, 1e-2),
) -> None:
    """Collect every problem with the module's arguments and raise once (one line per problem)."""

    def missing(path: str) -> bool:  # a local-looking path that does not exist (anything else may be a hub id)
        return (path.startswith((".", "/", "~")) or path.count("/") > 1) and not os.path.exists(path)

    problems = []
    for value, flag in ((target, "target"), (tokenizer, "tokenizer")):
        if value is not None and missing(resolve_path(value)):
            problems.append(f"`--model.{flag}` path {resolve_path(value)!r} does not exist. Fix the path or give a hub id.")
    if strategy not in STRATEGIES:
        problems.append(f"`--model.strategy` can be {', '.join(STRATEGIES)}, got {strategy!r}.")
    if not specs and strategy != "clm":
        problems.append(f"`--model.strategy {strategy}` needs at least one source in `--model.sources`.")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"Source names must be unique, got duplicates {dupes}. Rename them in `--model.sources`.")
    if specs and not 1 <= top_k <= len(specs):
        problems.append(f"`--model.top_k` must be between 1 and the number of sources ({len(specs)}), got {top_k}.")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        problems.append(f"`--model.threshold` must be in (0, 1], got {threshold}.")
    if not 0.0 <= clm_weight <= 1.0:
        problems.append(f"`--model.clm_weight` (lambda) must be between 0 and 1, got {clm_weight}.")
    if kind not in DISTILL_LOSSES:
        problems.append(f"`--model.distill_loss` can be {', '.join(DISTILL_LOSSES)}, got {kind!r}.")
    if not temperature > 0:
        problems.append(f"`--model.temperature` must be > 0, got {temperature}.")
    if distill_top_k < 1:
        problems.append(f"`--model.distill_top_k` must be >= 1, got {distill_top_k}.")
    for value, flag in zip(learning_rates, ("learning_rate", "selector_learning_rate")):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            problems.append(f"`--model.{flag}` must be > 0, got {value} (a learning rate <= 0 does not train).")
    if on_nonfinite not in ("stop", "skip_batch"):
        problems.append(f"`--model.on_nonfinite` can be stop, skip_batch, got {on_nonfinite!r}.")
    for i, spec in enumerate(specs):
        if not spec.name or not str(spec.name).strip():
            problems.append(f"source #{i + 1} has an empty name. Give every entry of `--model.sources` a `name`.")
        path = resolve_path(spec.path)
        if missing(path):
            problems.append(f"source {spec.name!r}: path {path!r} does not exist. Fix `path` in `--model.sources`.")
        if spec.tokenizer is not None and missing(resolve_path(spec.tokenizer)):
            problems.append(
                f"source {spec.name!r}: tokenizer {resolve_path(spec.tokenizer)!r} does not exist. Fix `tokenizer` in "
                "`--model.sources` (or leave it out to use the model's own)."
            )
        if spec.load_in_8bit not in ("auto", True, False):
            problems.append(f"source {spec.name!r}: `load_in_8bit` can be auto, true, false, got {spec.load_in_8bit!r}.")
    if problems:
        raise ValueError("\n".join(problems))

