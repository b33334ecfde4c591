"""Train a deltatune model in transformers' ``Trainer`` and in trainers built on it (TRL's).

:func:`delta_trainer` takes a trainer class (``transformers.Trainer``, TRL's ``SFTTrainer``,
``DPOTrainer``, ...) and returns its subclass for a model with deltas attached:

* checkpoints and ``save_model`` write the deltas only — deltatune's format, or PEFT's with
  ``save_format="peft"`` (:func:`deltatune.save`) — beside the optimizer, scheduler and trainer
  state, never the base weights;
* ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` fill the attached deltas
  back in place (:func:`deltatune.io.restore`), so the optimizer state that resumes with them
  still refers to the same parameters;
* a trainer whose constructor takes a ``ref_model`` (preference tuning: DPO) and is given none
  gets :func:`reference_model`: the same model with its deltas off. The base is the reference,
  as it is for a PEFT adapter, and no second copy of the weights is made.

transformers and TRL are imported by the caller, never here: TRL stays an optional extra.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from torch import nn

from .anatomy import check_model
from .api import deltas, disabled
from .config import check_choice
from .errors import ConfigError
from .io import FORMATS, check_peft_exportable, restore, save
from .layer import delta_layers


class _RunsWithDeltasOff:
    """Calls ``module`` (a part of ``model``) with every delta of ``model`` off."""

    def __init__(self, model: nn.Module, module: nn.Module):
        self.model, self.module = model, module

    def __call__(self, *args, **kwargs):
        with disabled(self.model):
            return self.module(*args, **kwargs)


class ReferenceModel(nn.Module):
    """``model`` with every delta off: the frozen reference a preference trainer asks for.

    It shares ``model``'s weights and owns no parameter, and ``model`` is not its submodule, so a
    trainer that prepares, moves or switches the reference to eval mode leaves the trained model
    as it is. It offers the part of a ``PreTrainedModel`` a reference is used through: calling it
    (``forward``), ``config``, ``base_model`` (the body, also run with the deltas off) and
    ``get_output_embeddings``; ``state_dict`` gives the weights it computes with, the base's, so
    a trainer that caches reference outputs under a hash of them tells two bases apart.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        check_model("reference_model", model)
        if not deltas(model):
            raise ConfigError("reference_model: the model has no delta attached, so its reference would be itself; "
                              "attach a delta first")
        object.__setattr__(self, "model", model)  # not registered: no parameters, no shared train()/eval()/to()
        self.config = model.config

    @property
    def base_model(self) -> _RunsWithDeltasOff:
        return _RunsWithDeltasOff(self.model, self.model.base_model)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def forward(self, *args, **kwargs):
        with disabled(self.model):
            return self.model(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        delta_prefixes = tuple(f"{path}.deltas." for path in delta_layers(self.model))
        return {k: v for k, v in self.model.state_dict(*args, **kwargs).items() if not k.startswith(delta_prefixes)}


def reference_model(model: nn.Module) -> ReferenceModel:
    """The frozen reference for preference tuning ``model``: ``model`` itself with its deltas
    off (see :class:`ReferenceModel`). Pass it as a trainer's ``ref_model``."""
    return ReferenceModel(model)


class DeltaTrainerMixin:
    """The behaviour :func:`delta_trainer` adds to a ``transformers.Trainer`` subclass."""

    def __init__(self, *args, save_format: str = "deltatune", **kwargs):
        check_choice("save_format", save_format, FORMATS)
        self.save_format = save_format
        call = inspect.signature(super().__init__).bind_partial(*args, **kwargs)
        model = call.arguments.get("model")
        if not isinstance(model, nn.Module) or not deltas(model):
            raise ConfigError(
                f"{type(self).__name__} trains the deltas of a model: pass model= a model with a delta attached "
                "(deltatune.attach), not a name or a model without deltas"
            )
        if save_format == "peft":  # refused now, not at the first checkpoint after minutes of training
            attached = deltas(model)
            check_peft_exportable(attached, attached)
        if call.arguments.get("peft_config") is not None:
            raise ConfigError(
                f"{type(self).__name__}: peft_config would wrap the model in a PEFT adapter on top of its deltas; "
                "leave it out (the deltas attached with deltatune.attach are what trains)"
            )
        if "ref_model" in call.signature.parameters and call.arguments.get("ref_model") is None:
            call.arguments["ref_model"] = reference_model(model)
        super().__init__(*call.args, **call.kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ConfigError(
                f"{type(self).__name__} saves deltas from the model's own modules, which DeepSpeed and FSDP shard; "
                "train without them (DDP works), or save the deltas yourself after gathering them"
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The deltas (and the tokenizer, as Trainer saves it), not the model's weights."""
        if not self.args.should_save:
            return
        target = Path(output_dir if output_dir is not None else self.args.output_dir)
        save(self.model, target, format=self.save_format)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(target)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # the deltas live on self.model, whichever wrapper of it the trainer passes
        restore(self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        restore(self.model, self.state.best_model_checkpoint)


def delta_trainer(trainer_class: type) -> type:
    """``trainer_class`` (``transformers.Trainer`` or a subclass, such as TRL's ``SFTTrainer`` or
    ``DPOTrainer``) made to train a deltatune model: checkpoints and ``save_model`` hold the deltas
    only, resuming restores them, and a preference trainer given no ``ref_model`` uses the base.

    The returned class takes the trainer's own arguments plus ``save_format`` ("deltatune", the
    default, or "peft" for directories ``peft.PeftModel.from_pretrained`` and serving engines load).
    """
    from transformers import Trainer

    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise ConfigError(f"delta_trainer takes transformers.Trainer or a subclass of it, not {trainer_class!r}")
    return type(f"Delta{trainer_class.__name__}", (DeltaTrainerMixin, trainer_class), {
        "__doc__": f"{trainer_class.__name__} training the deltas of a deltatune model ({__name__}.delta_trainer).",
        "__module__": __name__,
    })
