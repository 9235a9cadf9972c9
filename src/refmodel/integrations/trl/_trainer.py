"""What the three trainer subclasses share: argument binding, the reference plan, and the set-up.

The subclasses keep TRL's own code path and change only where the reference comes from. During
TRL's ``__init__`` they set the config so that TRL builds no reference model of its own
(``precompute_ref_log_probs=True`` for DPO/KTO, whose precompute pass is replaced by a no-op;
``beta=0.0`` for GRPO) and run no ``SyncRefModelCallback`` (refmodel's ``Synced`` replaces it); the
user's values are restored on the config afterwards. At loss time the reference log-probs are
computed by refmodel on TRL's collated batch and handed to TRL's loss through the fields TRL already
reads for precomputed references.

Under FSDP, TRL 1.16's DPO and KTO trainers load a reference model even with
``precompute_ref_log_probs=True`` (to run their precompute pass before the policy is sharded), from the
policy's ``_name_or_path`` (the Hub, or a folder that may not exist on this node), then shard it on every
rank and drop it. :class:`AfterTrainerInit` hides FSDP from the rest of TRL's ``__init__`` for that one
decision, so that no reference model is built or loaded under any launcher.
"""

from __future__ import annotations

import inspect

import transformers

from ...cluster import get_logger
from ...errors import ConfigError
from ...reference import ReferenceConfig, Synced, resolve
from ...reference.peft_policy import is_peft_model
from ._reference import ReferenceRunner, patched, unwrap
from .callback import RefmodelCallback

log = get_logger(__name__)  # shared warnings: main process only (refmodel.cluster)


def bind_arguments(init, trainer, args: tuple, kwargs: dict) -> dict:
    """TRL ``__init__``'s arguments by name (positional ones included), defaults filled in."""
    bound = inspect.signature(init).bind(trainer, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self", None)
    return out


def default_config(config_cls, model, suffix: str):
    """TRL's default config for ``model`` (what TRL builds when ``args=None``)."""
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model") or "model"
    return config_cls(f"{str(name).split('/')[-1]}-{suffix}")


def dataset_columns(dataset) -> list[str]:
    return list(getattr(dataset, "column_names", None) or [])


class RefmodelTrainerMixin:
    """Set-up shared by ``DPOTrainer``, ``KTOTrainer`` and ``GRPOTrainer`` (see the module docstring)."""

    _refmodel_runner: ReferenceRunner | None = None
    _refmodel_skip_precompute: bool = False
    _refmodel_hide_fsdp: bool = False

    @property
    def reference(self):
        """The refmodel Reference this trainer uses (None when TRL handles the reference itself)."""
        return None if self._refmodel_runner is None else self._refmodel_runner.reference

    @property
    def reference_runner(self) -> ReferenceRunner | None:
        """Counters of the reference calls (rows, seconds, store hits and misses)."""
        return self._refmodel_runner

    def _refmodel_plan(self, reference, cfg, bound: dict, who: str) -> str | None:
        """``"reference"`` (refmodel computes pi_ref), ``"sync"`` (PEFT TR-DPO), or None (plain TRL)."""
        model, ref_model = bound["model"], bound.get("ref_model")
        peft = bound.get("peft_config") is not None or is_peft_model(model)
        if reference is not None:
            if ref_model is not None:
                raise ConfigError(f"{who}: pass reference= (a refmodel reference) or ref_model= (TRL's), not both")
            if getattr(cfg, "precompute_ref_log_probs", False):
                raise ConfigError(f"{who}: reference= replaces TRL's own reference pass, so "
                                  "precompute_ref_log_probs=True has nothing to precompute; set it to False (a "
                                  "refmodel store, reference=PATH or Precomputed(store), is refmodel's precompute)")
            if cfg.sync_ref_model and not (isinstance(reference, (Synced, ReferenceConfig))):
                raise ConfigError(f"{who}: sync_ref_model=True moves the reference, but reference= is a fixed "
                                  f"{type(reference).__name__}; drop sync_ref_model, or pass "
                                  "reference=ReferenceConfig(sync_ref_model=True, max_rank=...) or a Synced reference")
            return "reference"
        if cfg.sync_ref_model and peft:
            if getattr(cfg, "precompute_ref_log_probs", False):
                raise ConfigError(f"{who}: sync_ref_model=True moves the reference, so precomputed reference "
                                  "log-probs (precompute_ref_log_probs=True) would go stale; use one of them")
            return "sync"
        return None

    def _refmodel_init_precomputing(self, trl_cls, config_cls, suffix: str, args: tuple, kwargs: dict, reference,
                                    ref_columns: tuple[str, ...]):
        """``__init__`` of the DPO and KTO subclasses up to the reference: ``(mode, cfg, bound)``.

        Binds TRL's arguments, plans the reference (``"columns"`` when the dataset already carries every
        one of ``ref_columns`` and TRL was given no reference of its own), then runs TRL's ``__init__``:
        unchanged for plain TRL (``mode`` None), else with ``precompute_ref_log_probs=True`` and no sync
        callback so that TRL loads no reference model (its precompute pass is a no-op here).
        """
        who = trl_cls.__name__
        bound = bind_arguments(trl_cls.__init__, self, args, kwargs)
        cfg = bound["args"] or default_config(config_cls, bound["model"], suffix)
        bound["args"] = cfg
        mode = self._refmodel_plan(reference, cfg, bound, who)
        if mode is None and bound.get("ref_model") is None and not cfg.precompute_ref_log_probs \
                and all(c in dataset_columns(bound["train_dataset"]) for c in ref_columns):
            mode = "columns"
        self._refmodel_mode = mode
        if mode is None:
            trl_cls.__init__(self, **bound)
            return mode, cfg, bound
        self._refmodel_skip_precompute = True
        self._refmodel_hide_fsdp = True
        try:
            with patched(cfg, precompute_ref_log_probs=True, sync_ref_model=False):
                trl_cls.__init__(self, **bound)
        finally:
            self._refmodel_hide_fsdp = False
            if "_refmodel_is_fsdp" in self.__dict__:
                self.is_fsdp_enabled = self.__dict__.pop("_refmodel_is_fsdp")
        self.precompute_ref_logps = False  # set only around the loss (see the subclasses' _compute_loss)
        return mode, cfg, bound

    def _refmodel_trainer_ready(self) -> None:
        """Called by :class:`AfterTrainerInit` between transformers' ``Trainer.__init__`` and the rest of TRL's.

        While ``_refmodel_hide_fsdp`` is set (TRL's DPO / KTO ``__init__`` with refmodel's reference),
        TRL sees FSDP off: with ``precompute_ref_log_probs=True`` it then keeps ``ref_model=None``, as it
        does without FSDP, instead of loading a copy. The only other uses of the flag in the rest of
        TRL 1.16's DPO / KTO ``__init__`` act on a reference model (there is none) or run the precompute
        pass (a no-op here); the real value is restored as soon as TRL's ``__init__`` returns.
        """
        if self._refmodel_hide_fsdp and self.is_fsdp_enabled:
            self._refmodel_is_fsdp = True
            self.is_fsdp_enabled = False

    def _refmodel_build(self, mode: str, reference, cfg, *, temperature: float, who: str):
        """The Reference, built after TRL's ``__init__`` (the policy is then final: PEFT-wrapped)."""
        policy = unwrap(self)
        rc = reference if isinstance(reference, ReferenceConfig) else None
        if mode == "sync" or (rc is not None and (rc.sync_ref_model or cfg.sync_ref_model)):
            # TRL's settings when its config asks for the sync, else the ReferenceConfig's
            source = cfg if cfg.sync_ref_model or rc is None else rc
            steps, alpha = source.ref_model_sync_steps, source.ref_model_mixup_alpha
            ref = Synced(policy, ref_model_sync_steps=steps, ref_model_mixup_alpha=alpha,
                         max_rank=None if rc is None else rc.max_rank, temperature=temperature,
                         # TRL may own an adapter called "ref" (a copy of a pretrained adapter)
                         adapter_name="synced_ref")
            log.info("%s: TR-DPO reference %r (every %d steps, alpha=%s)", who, ref, steps, alpha)
            return ref
        return resolve(reference, policy, temperature=temperature, who=who)

    def _refmodel_attach(self, ref, *, hint: str = "", kl_threshold: float | None = None) -> None:
        tokenizer = getattr(self, "_tokenizer", None) or getattr(self, "processing_class", None)
        self._refmodel_runner = ReferenceRunner(ref, tokenizer=tokenizer, hint=hint)
        callback = RefmodelCallback(self._refmodel_runner, metrics=getattr(self, "_metrics", None),
                                    unwrap=lambda m: unwrap(self, m), kl_threshold=kl_threshold)
        self.add_callback(callback)  # type: ignore[attr-defined]
        log.info("%s: reference log-probs from refmodel %r; TRL holds no reference model", type(self).__name__, ref)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # refmodel answers the reference at loss time; TRL's precompute pass is not run.
        if self._refmodel_skip_precompute:
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


class AfterTrainerInit(transformers.Trainer):
    """A step between transformers' ``Trainer.__init__`` and the rest of TRL's ``__init__``.

    Listed after the TRL class among a subclass's bases (``class DPOTrainer(RefmodelTrainerMixin,
    trl.DPOTrainer, AfterTrainerInit)``), it comes right before ``transformers.Trainer`` in the method
    resolution order, so TRL's ``super().__init__(...)`` runs this ``__init__``, which calls the
    ``Trainer``'s and then :meth:`RefmodelTrainerMixin._refmodel_trainer_ready`. TRL's own code runs unchanged.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refmodel_trainer_ready()  # type: ignore[attr-defined]


__all__ = ["AfterTrainerInit", "RefmodelTrainerMixin", "bind_arguments", "dataset_columns", "default_config"]
