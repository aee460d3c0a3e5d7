"""FusionModule: frozen sources -> (alignment) -> selector -> weighted fusion -> distillation into the target.

Extension points for subclasses (each a small method): ``build_target``, ``build_sources``, ``build_selector``,
``run_sources`` (how source outputs are obtained), ``selector_features`` (what the selector sees),
``fusion_weights`` (how sources are weighted) and ``fuse_distributions`` (how they are mixed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_fuse.alignment.aligner import AlignedBatch
from lightning_fuse.arguments import validate_arguments, validate_routing, validate_schedule, validate_token
from lightning_fuse.callbacks import SelectionFeedback
from lightning_fuse.dense import distill_terms
from lightning_fuse.domain_metrics import DomainMetrics
from lightning_fuse.fusion import (
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
from lightning_fuse.resume import restore
from lightning_fuse.schedule import LRSchedule, lr_factor
from lightning_fuse.selector import Selection, Selector, SelectorFeatures
from lightning_fuse.sources import (
    DType,
    FrozenSource,
    SourceSpec,
    load_causal_lm,
    load_config,
    load_tokenizer,
    tokenizer_fingerprint,
)
from lightning_fuse.student import StudentStats, chunked_argmax, student_stats
from lightning_fuse.token_fusion import (
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
        validate_arguments(specs, strategy, top_k, threshold, clm_weight, distill_loss, temperature, distill_top_k, on_nonfinite,
                  target=target, tokenizer=tokenizer, learning_rates=(learning_rate, selector_learning_rate))
        validate_routing(routing, strategy, selector_features, explore, selector_warmup_steps)
        validate_token(selection, strategy, token_features, token_width, token_window)
        validate_schedule(lr_schedule, lr_floor)
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
        """Resume with this module's settings (the user's config), refusing those that cannot change; sources may
        be appended (the selector grows). ``lightning_fuse.resume.restore``."""
        restore(self, checkpoint)

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
        self.eval_metrics = DomainMetrics(self._domains(), self.source_names).to(self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    @torch.no_grad()
    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        self.eval_metrics.update(self._step(batch, "val"), batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def _eval_end(self, stage: str) -> None:
        results = self.eval_metrics.results(stage, distributed=self.trainer.world_size > 1)
        for source in self.sources:
            if source.aligner is not None:
                results[f"align/rate/{source.name}"] = source.alignment_rate
                results.update({f"align/mass_{k}/{source.name}": v for k, v in source.mass.shares().items()})
        self.log_dict(results, sync_dist=False)
        self.log(f"{stage}/loss", self.eval_metrics.loss.compute(), prog_bar=True)
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
