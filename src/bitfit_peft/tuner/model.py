"""The BitFit tuner: selects bias-bearing modules, wraps them, and routes mixed-task batches."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule
from peft.utils.other import AuxiliaryTrainingWrapper, set_additional_trainable_modules
from torch import nn

from bitfit_peft.errors import BitFitError
from bitfit_peft.files import delta_format
from bitfit_peft.names import DELTA_KEY, PEFT_PREFIX
from bitfit_peft.tasks import head_labels, with_task_heads
from bitfit_peft.tuner.base_check import base_fingerprint, base_matches, other_base_error
from bitfit_peft.tuner.base_modules import execution_device
from bitfit_peft.tuner.call_plan import CallPlanMixin, layers_and_heads
from bitfit_peft.tuner.combine import combined_config, fill_weighted
from bitfit_peft.tuner.config import SAVE_DTYPES, BitFitConfig
from bitfit_peft.tuner.groups import primary_group
from bitfit_peft.tuner.layer import BitFitLayer, BitFitWrapper, expected_tensors, layers_holding
from bitfit_peft.tuner.merging import MergeMixin
from bitfit_peft.tuner.routing import Routing, check_adapter_name
from bitfit_peft.tuner.targets import resolve_targets as _resolve_targets
from bitfit_peft.tuner.unwrap import strip_wrappers


class BitFitModel(CallPlanMixin, MergeMixin, BaseTuner):
    """Bias-only fine-tuning (BitFit, Ben-Zaken et al. 2021) as a PEFT tuner.

    Args:
        model: the transformers (or plain torch) model to adapt.
        config: the :class:`~bitfit_peft.BitFitConfig`.
        adapter_name: name of the first adapter (``"default"``).

    Example:
        >>> import bitfit_peft, torch
        >>> from peft import get_peft_model
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> model = get_peft_model(net, bitfit_peft.BitFitConfig())
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)  # doctest: +NORMALIZE_WHITESPACE
        ['base_model.model.0.bitfit_delta.default', 'base_model.model.1.bitfit_delta.default']
    """

    prefix: str = "bitfit_"
    tuner_layer_cls = BitFitLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        self._routing = Routing()
        self._structure_cache = None
        self._injecting: str | None = None  # the adapter being injected (PEFT may share one config object)
        self._resolved_targets: dict[str, set[str]] = {}
        self._precomputing = False
        self._mixed_staged: list[BitFitLayer] | None = None
        self._batch_check_handle: Any = None
        self._flat_tables: dict = {}
        super().__init__(model, config, adapter_name, **kwargs)

    # ------------------------------------------------------------------ target selection
    def _prepare_adapter_config(self, peft_config: BitFitConfig, model_config: dict) -> BitFitConfig:
        """Resolve the targets up front and check the fingerprint, so nothing changes if anything is wrong."""
        adapter_name = self._injecting or next(name for name, cfg in self.peft_config.items() if cfg is peft_config)
        # transformers' add_adapter: the task head is trained and saved, as PeftModelFor<task> does
        peft_config.modules_to_save = with_task_heads(peft_config.modules_to_save, peft_config.task_type)
        targets = self.resolve_targets(self.model, peft_config)
        if not base_matches(peft_config, self.model, sorted(targets)):
            raise other_base_error(adapter_name, peft_config.base_fingerprint)
        self._resolved_targets[adapter_name] = targets
        return peft_config

    @staticmethod
    def resolve_targets(model: nn.Module, config: BitFitConfig) -> set[str]:
        """Names of the modules that ``config`` selects in ``model`` (raises a clear error if none).

        See :func:`bitfit_peft.tuner.targets.resolve_targets`: the result also carries ``.excluded``.
        """
        return _resolve_targets(model, config)

    def _check_target_module_exists(self, peft_config: BitFitConfig, key: str) -> Any:  # type: ignore[override]
        """Membership in the resolution stored by ``_prepare_adapter_config`` (no config regex runs here)."""
        names = [self._injecting] if self._injecting else [n for n, c in self.peft_config.items() if c is peft_config]
        for name in names:
            resolved = self._resolved_targets.get(name, set())
            if key in resolved:
                return True
            if key in getattr(resolved, "excluded", ()):
                return _ExcludedModule()  # lets PEFT see that exclude_modules did exclude something
        return False

    def _check_tied_modules(self, model: nn.Module, peft_config: BitFitConfig) -> None:
        """Nothing to tie (BitFit adapts no embedding); skipping PEFT's check keeps a regex out of ``re``."""

    def _check_new_adapter_config(self, config: BitFitConfig) -> None:
        if not isinstance(config, BitFitConfig):
            raise BitFitError(f"Expected a BitFitConfig, got {type(config).__name__}.")

    # ------------------------------------------------------------------ module creation
    def _create_and_replace(
        self,
        config: BitFitConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, BitFitLayer):
            target.update_layer(adapter_name, init_weights=config.init_weights, inference_mode=config.inference_mode)
            return
        new_module = BitFitWrapper(
            target,
            adapter_name,
            init_weights=config.init_weights,
            inference_mode=config.inference_mode,
            bias_group=primary_group(current_key, target),
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """PEFT's ``_replace_module`` reduced to what a wrapper with only a delta storage needs: put it in place and
        move the deltas to the base's device, unless they (``low_cpu_mem_usage``) or the base are on meta."""
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        for name, module in new_module.named_modules():
            if self.prefix in name:
                ref = next(
                    (t for t in (getattr(child, "weight", None), getattr(child, "bias", None)) if t is not None),
                    None,
                )
                on_meta = any(p.device.type == "meta" for p in module._parameters.values())  # low_cpu_mem_usage
                device = execution_device(child) or (ref.device if ref is not None else None)  # hooked: its device
                if device is not None and device.type != "meta" and not on_meta:
                    module.to(device)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if self.prefix not in name:
                param.requires_grad = False
        for module in model.modules():
            if isinstance(module, BitFitLayer):
                module._freeze_non_trainable_peft_weights()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Deltas are fp32 whatever the base dtype (the low-memory mode relies on it), which is what PEFT's default
        ``autocast_adapter_dtype=True`` asks for; with ``False`` they take the base layer's dtype, as in PEFT."""
        if autocast_adapter_dtype:
            return
        for layer in layers_holding(self.model, adapter_name).values():
            weight = getattr(layer.get_base_layer(), "weight", None)
            delta = layer.delta_of(adapter_name)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point() and delta.device.type != "meta":
                delta.data = delta.data.to(weight.dtype)

    # ------------------------------------------------------------------ adapters
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Create ``adapter_name`` whose deltas and heads are ``sum(w_i * adapter_i)`` (see
        :mod:`~bitfit_peft.tuner.combine`). A refused or failed call leaves nothing behind.

        Example:
            >>> import torch, bitfit_peft
            >>> from peft import get_peft_model
            >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), bitfit_peft.BitFitConfig())
            >>> model.add_adapter("other", bitfit_peft.BitFitConfig(init_weights=False))
            >>> model.base_model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
            >>> layer = model.base_model.model[0]
            >>> torch.equal(layer.delta_of("mix"), 0.5 * layer.delta_of("other"))
            True
        """
        config, heads = combined_config(self, adapters, weights, adapter_name)  # checks first: nothing changed
        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
            fill_weighted(self, adapters, weights, adapter_name, heads)
        except Exception:
            self.delete_adapter(adapter_name)  # the adapters combined are still there: never the last one
            raise
        self._mark_only_adapters_as_trainable(self.model)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate adapter(s) in one pass over cached layer/head lists (no per-module PEFT bookkeeping); the
        activated deltas become trainable unless ``inference_mode``, all others are frozen, as in PEFT."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found; loaded: {sorted(self.peft_config)}.")
        layers, heads, params = self._structure()
        head_plan = [(head, head.check_set_adapter(adapter_name)) for head in heads]  # PEFT's rule; raises first
        for layer in layers:
            if layer.merged_adapters:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging first.", stacklevel=2)
                layer.unmerge()
            layer._active_adapter = adapter_name
            layer.drop_precomputed_bias()
        trainable = set() if inference_mode else set(names)
        for name, group in params.items():
            wanted = name in trainable
            if group and (wanted or group[0].requires_grad):  # frozen adapters stay untouched: O(adapters)
                for param in group:
                    param.requires_grad_(wanted)
        for head, name in head_plan:  # as peft.utils.other._set_adapter: heads without that adapter are disabled
            head.set_adapter(name if name in head._adapters else [], inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def _structure(self) -> tuple[list[BitFitLayer], list[AuxiliaryTrainingWrapper], dict[str, list]]:
        """BitFit layers, head wrappers and per-adapter delta parameters (cached until the structure changes)."""
        cache = getattr(self, "_structure_cache", None)
        if cache is not None:
            return cache
        layers, heads = layers_and_heads(self.model)
        params: dict[str, list] = {}
        for layer in layers:
            for name, delta in layer._deltas.items():
                params.setdefault(name, []).append(delta)
        result = (layers, heads, params)
        if self._injecting is None:  # PEFT adds head wrappers right after injection
            self._structure_cache = result
        return result

    def _invalidate_structure(self) -> None:
        self._structure_cache = None

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        check_adapter_name(adapter_name)
        self._invalidate_structure()
        outer, self._injecting = self._injecting, adapter_name
        try:
            if not (state_dict is None and not low_cpu_mem_usage and self._inject_into_existing(model, adapter_name)):
                super().inject_adapter(
                    model,
                    adapter_name,
                    autocast_adapter_dtype=autocast_adapter_dtype,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                    state_dict=state_dict,
                )
        finally:
            self._injecting = outer
            self._invalidate_structure()

    def _inject_into_existing(self, model: nn.Module, adapter_name: str) -> bool:
        """Fast path for one more adapter on modules that are all BitFit layers already (serving, hot loads).

        PEFT's generic injection re-scans every module against every existing adapter layer; here the targets
        are resolved once and each layer just gains a delta. Returns False (nothing done) if any target is new.
        """
        modules = list(model.modules())  # one walk serves both checks below
        if not any(isinstance(m, BitFitLayer) for m in modules):
            return False
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        config = self._prepare_adapter_config(config, self.get_model_config(model))  # raises before changes
        targets = sorted(self._resolved_targets[adapter_name])
        layers = [model.get_submodule(name) for name in targets]
        if not all(isinstance(layer, BitFitLayer) for layer in layers):
            return False
        # Adding must not change trainability. update_layer only sets the new vectors' flags, so only the head
        # wrappers (set_additional_trainable_modules) can touch existing ones: snapshot just those.
        heads = [m for m in modules if isinstance(m, AuxiliaryTrainingWrapper)]
        existing = [(p, p.requires_grad) for head in heads for p in head.parameters()]
        for layer in layers:
            layer.update_layer(adapter_name, init_weights=config.init_weights, inference_mode=config.inference_mode)
            if adapter_name not in self.active_adapters:
                layer.delta_of(adapter_name).requires_grad_(False)
        self.targeted_module_names = sorted(set(self.targeted_module_names) | set(targets))
        set_additional_trainable_modules(
            model=model,
            peft_config=config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
            activate_adapter=adapter_name in self.active_adapters,
        )
        for param, requires_grad in existing:
            param.requires_grad = requires_grad
        return True

    def attach_adapter(
        self,
        adapter_name: str,
        config: BitFitConfig,
        deltas: Mapping[BitFitLayer, nn.Parameter],
        heads: Mapping[AuxiliaryTrainingWrapper, nn.Module],
        targets: set[str],
    ) -> None:
        """Put a ready adapter into the model in O(its layers): its config, its delta per layer, its head copies.

        For callers that built (and checked) the tensors themselves, such as the serving registry, which reads an
        adapter file straight into the layout of an adapter PEFT loaded before. ``targets`` are the module names
        of ``deltas``. The tensors are used as they are (not copied). Clears exactly the caches this changes.
        """
        for layer, delta in deltas.items():
            layer.attach(adapter_name, delta)
        for wrapper, head in heads.items():
            wrapper.modules_to_save[adapter_name] = head
            wrapper._adapters.add(adapter_name)
        self.peft_config[adapter_name] = config
        self._resolved_targets[adapter_name] = targets
        if self._structure_cache is not None:
            self._structure_cache[2][adapter_name] = list(deltas.values())
        self._flat_tables = {}  # the concatenated tables of earlier mixed calls: rebuilt with the new layout

    def detach_adapter(self, adapter_name: str) -> None:
        """Take one adapter out in O(layers): its deltas, head copies and config; the inverse of
        :meth:`attach_adapter`. Unlike PEFT's ``delete_adapter`` it does not touch the active adapter (move it to
        another adapter first) and keeps every other cache."""
        if adapter_name in self.active_adapters:
            raise BitFitError(f"Adapter {adapter_name!r} is active; call set_adapter() with another one first.")
        layers, heads, params = self._structure()
        for layer in layers:
            if adapter_name in layer._deltas:
                layer.detach(adapter_name)
        for wrapper in heads:
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
                wrapper._adapters.discard(adapter_name)
        self.peft_config.pop(adapter_name, None)
        self._resolved_targets.pop(adapter_name, None)
        params.pop(adapter_name, None)
        self._flat_tables = {}  # they hold the detached deltas' values: free them now, not at the next mixed call

    def replace_adapter_values(
        self, adapter_name: str, config: BitFitConfig, values: Mapping[str, torch.Tensor]
    ) -> None:
        """Overwrite the tensors of adapter ``adapter_name`` in place and make ``config`` its config (a hot-swap).

        ``values`` maps keys of this model's state dict (``<module>.bitfit_delta.<adapter>``,
        ``<module>.modules_to_save.<adapter>.<param>``) to values of the same shapes. The Parameters stay the same
        objects, so optimizers and compiled graphs keep them. Every key and shape is checked, and every value cast
        to its destination's device and dtype, before anything changes; then the caches of the old values go.
        """
        if adapter_name not in self.peft_config:
            raise BitFitError(f"No adapter {adapter_name!r}; loaded: {sorted(self.peft_config)}.")
        destinations = {key: self._adapter_tensor(adapter_name, key) for key in values}
        wrong = [f"{k}: {tuple(v.shape)} vs {tuple(destinations[k].shape)}" for k, v in values.items()
                 if v.shape != destinations[k].shape]
        if wrong:
            raise BitFitError(f"Cannot replace adapter {adapter_name!r}: other shapes ({wrong[:2]}). Nothing changed.")
        staged = {k: v.to(device=destinations[k].device, dtype=destinations[k].dtype) for k, v in values.items()}
        with torch.no_grad():
            for key, value in staged.items():
                destinations[key].copy_(value)  # bumps _version, as the cached mixed-batch tables check
        for layer in self._structure()[0]:
            if adapter_name in layer._deltas:
                layer.drop_cached_tables()
        self._flat_tables = {}
        self.peft_config[adapter_name] = config

    def _adapter_tensor(self, adapter_name: str, key: str) -> torch.Tensor:
        """The delta or head tensor of ``adapter_name`` that the state-dict key ``key`` names (else BitFitError)."""
        module_name, _, attr = key.rpartition(".")
        ours = key.endswith(f".{DELTA_KEY}.{adapter_name}") or f".modules_to_save.{adapter_name}." in key
        try:
            tensor = getattr(self.model.get_submodule(module_name), attr, None) if ours else None
        except AttributeError:  # no such module
            tensor = None
        if not isinstance(tensor, torch.Tensor):
            raise BitFitError(f"{key!r} names no tensor of adapter {adapter_name!r}. Nothing was changed.")
        return tensor

    def delete_adapter(self, adapter_name: str) -> None:
        self._invalidate_structure()
        super().delete_adapter(adapter_name)
        self._invalidate_structure()

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        self._invalidate_structure()
        self._clear_routing()
        if self._batch_check_handle is not None:  # the unloaded model must not keep our hook
            self._batch_check_handle.remove()
            self._batch_check_handle = None
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def bitfit_layers(self, adapter_name: str | None = None) -> dict[str, BitFitLayer]:
        """``{module name: layer}`` for every BitFit layer (holding ``adapter_name``, if given)."""
        return layers_holding(self.model, adapter_name)

    # ------------------------------------------------------------------ save / load
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection, then the BitFit save options: fingerprint, labels, pruning, ``save_dtype``."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        config.base_fingerprint = base_fingerprint(model, sorted(layers_holding(model, adapter_name)))
        config.num_labels, config.id2label = head_labels(getattr(model, "config", None), config)
        dtype = SAVE_DTYPES[config.save_dtype]
        out = {}
        for name, tensor in selected.items():
            if f".{DELTA_KEY}." not in name:
                out[name] = tensor
                continue
            if not torch.isfinite(tensor).all():
                warnings.warn(f"Saving NaN/Inf values in {name}: this adapter is broken.", stacklevel=2)
            elif config.prune_tolerance is not None and tensor.abs().float().mean() < config.prune_tolerance:
                continue
            elif dtype is not tensor.dtype and dtype.is_floating_point and tensor.abs().max() > torch.finfo(dtype).max:
                raise BitFitError(
                    f"Cannot save {name} as save_dtype={config.save_dtype!r}: its largest value "
                    f"{float(tensor.abs().max()):.4g} overflows {config.save_dtype} (max "
                    f"{torch.finfo(dtype).max:.4g}). Nothing was written. Use save_dtype='float32' or 'bfloat16'."
                )
            out[name] = tensor.to(dtype)
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """0.1.0 files converted, keys mapped with PEFT's own rule, then the strict gate (rolled back on refusal)."""
        deltas, heads = expected_tensors(model, adapter_name)
        checkpoint_to_model = {}
        for model_key in deltas:  # PEFT's mapping, built from our layers instead of a full model.state_dict()
            checkpoint_key = cls._remove_adapter_name_from_key(model_key, adapter_name)
            checkpoint_to_model[checkpoint_key] = model_key
            if not model_key.startswith(PEFT_PREFIX):  # layers injected straight into a model (transformers)
                checkpoint_to_model[PEFT_PREFIX + checkpoint_key] = model_key
        try:
            state_dict = delta_format.from_legacy(state_dict, mapped=heads)
            remapped = {checkpoint_to_model.get(k, k): v for k, v in state_dict.items()}
            if config.prune_tolerance is not None:
                remapped = delta_format.fill_pruned(remapped, deltas)
            delta_format.check_adapter_state_dict(remapped, adapter_name, deltas, heads)
        except BitFitError:
            _rollback(model, adapter_name)
            raise
        return remapped


def _rollback(model: nn.Module, adapter_name: str) -> None:
    """Undo the injection of ``adapter_name`` after a failed load, leaving the model as before."""
    peft_config = getattr(model, "peft_config", {})
    if adapter_name not in peft_config:  # rolled back already (by the strict check)
        return
    others = [name for name in peft_config if name != adapter_name]
    tuner = getattr(model, "base_model", None)
    if others and hasattr(model, "delete_adapter"):
        model.delete_adapter(adapter_name)
    elif isinstance(tuner, BitFitModel):
        strip_wrappers(tuner.model)  # not unload(): that would keep the heads' adapter copies
        tuner._invalidate_structure()
        tuner.peft_config.pop(adapter_name, None)
