"""Any Captum attribution method by name: ``captum:DeepLift``, ``captum:LayerGradCam``, ...

``bs.explain(model, x, "captum:NAME", **options)`` builds ``captum.attr.NAME``
on the model and calls its ``attribute(x, target=target, **options)``. Options
named in the class's constructor (``multiply_by_inputs``, ``eps``, ...) go to
the constructor; ``layer`` names the layer of layer methods (``LayerGradCam``,
``GuidedGradCam``, ...) as in ``model.named_modules()``, e.g. ``"features.28"``.
Captum's own ``method`` option (the quadrature of ``IntegratedGradients``,
``LayerConductance``, ...) is given as ``rule``, as for the built-in
``integrated_gradients``: ``method`` names the explanation method itself.
Because beta-smoothing acts on the model, every Captum method works under it:
``bs.explain(model, x, "beta_smooth", beta=2.0, base="captum:Occlusion", ...)``.
Captum is optional (``pip install 'betasmooth[captum]'``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import re
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import nn

from ..validate import InputError, InputTypeError, is_oom
from . import Method, register_prefix
from .gradient import predict

__all__ = ["captum_method", "resolve_layer"]

# Constructor parameters that explain fills itself.
_MODEL_PARAMETERS = ("forward_func", "model")
# Captum's option -> its name here, where ``method`` is taken by explain's own argument.
_RENAMED = {"method": "rule"}
_FILLED = frozenset({"self", "layer", *_MODEL_PARAMETERS})
# Captum documents the **kwargs of their attribute as ignored ("used by child
# classes such as Occlusion"): a misspelt option would vanish there unnamed.
_KWARGS_FOR_SUBCLASSES = frozenset({"FeatureAblation", "FeaturePermutation"})
_LISTING = "python -c 'import captum.attr; print(captum.attr.__all__)'"


def _captum_attr() -> ModuleType:
    try:
        return importlib.import_module("captum.attr")
    except ImportError:
        raise InputError(
            "captum: methods need Captum; install the extra: pip install 'betasmooth[captum]'"
        ) from None


def _attribution_class(name: str) -> type:
    cls = getattr(_captum_attr(), name, None)
    attribute = getattr(cls, "attribute", None)
    if not inspect.isclass(cls) or attribute is None:
        raise InputError(
            f"unknown Captum method {name!r}; expected a class of captum.attr such as "
            f"captum:DeepLift or captum:Occlusion (list them with: {_LISTING})"
        )
    init = list(inspect.signature(cls.__init__).parameters)[1:2]
    if init[:1] != ["forward_func"] and init[:1] != ["model"]:
        raise InputError(
            f"captum:{name} is built from {init[0] if init else 'nothing'!r}, not from a model; "
            "expected a method whose constructor takes the model (smoothgrad replaces NoiseTunnel)"
        )
    if "target" not in inspect.signature(attribute).parameters:
        raise InputError(f"captum:{name}.attribute takes no target; expected a class-wise method")
    return cls


def _accepted_options(cls: type) -> frozenset[str] | None:
    """The options of ``captum:NAME``: its constructor's and ``attribute``'s, and ``layer``.

    ``None`` where either takes ``**kwargs`` that it uses: then Captum alone knows.
    """
    init = list(inspect.signature(cls.__init__).parameters.values())[1:]
    # attribute(self, inputs, ...): inputs is x itself, and explain passes target.
    attribute = list(inspect.signature(cls.attribute).parameters.values())[2:]
    if cls.__name__ in _KWARGS_FOR_SUBCLASSES:
        attribute = [p for p in attribute if p.kind is not p.VAR_KEYWORD]
    if any(p.kind is p.VAR_KEYWORD for p in init + attribute):
        return None
    names = {
        _RENAMED.get(p.name, p.name) for p in init + attribute if p.kind is not p.VAR_POSITIONAL
    }
    # layer stays known, so that a method without one says so (see _build).
    return frozenset((names - _FILLED - {"target"}) | {"layer"})


def _required(cls: type) -> list[str]:
    """Options without a default in ``cls``'s constructor or ``attribute``, but those filled."""
    init = list(inspect.signature(cls.__init__).parameters.values())[1:]
    attribute = list(inspect.signature(cls.attribute).parameters.values())[2:]
    return [
        _RENAMED.get(p.name, p.name)
        for p in init + attribute
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in _FILLED | {"target"}
    ]


def resolve_layer(model: nn.Module, layer: str | nn.Module | None, method: str) -> nn.Module:
    """The submodule ``layer`` of ``model``, named as in ``model.named_modules()``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    >>> resolve_layer(net, "0", "captum:LayerGradCam")
    Conv2d(1, 2, kernel_size=(3, 3), stride=(1, 1))
    >>> resolve_layer(net, 1, "captum:LayerGradCam")  # an index, as --option layer=1 gives it
    ReLU()
    """
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, int) and not isinstance(layer, bool):
        layer = str(layer)  # nn.Sequential's layers are named by their index
    if not isinstance(layer, str):
        raise InputTypeError(
            f"{method} needs the option layer, a submodule name of the model such as "
            f"'features.28'; got {type(layer).__name__}"
        )
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name][:8]
        raise InputError(
            f"{method}: the model has no submodule {layer!r}; expected a name from "
            f"model.named_modules(), e.g. {', '.join(names)}"
        ) from None


def _build(cls: type, model: nn.Module, layer: object, options: dict) -> tuple[object, dict]:
    parameters = inspect.signature(cls.__init__).parameters
    method = f"captum:{cls.__name__}"
    captum_names = {ours: theirs for theirs, ours in _RENAMED.items()}
    options = {captum_names.get(k, k): v for k, v in options.items()}
    constructor = {k: v for k, v in options.items() if k in parameters and k not in _FILLED}
    args: list[object] = [model]
    if "layer" in parameters:
        args.append(resolve_layer(model, layer, method))
    elif layer is not None:
        raise InputError(f"{method} has no layer; expected the option layer only for layer methods")
    attribute = {k: v for k, v in options.items() if k not in constructor}
    return cls(*args, **constructor), attribute


def _broadcast(baselines: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """``baselines`` on ``x``'s device and dtype, with its item shape.

    One colour per channel, ``(1, C, 1, 1)`` or ``(C, 1, 1)``, becomes
    ``(1, C, H, W)``: Captum broadcasts such a baseline for most methods but
    wants the item shape exactly where it draws from a distribution of
    baselines (``GradientShap``, ``DeepLiftShap``). The first dimension, the
    number of baselines, is Captum's to check against each method's rule.

    Raises
    ------
    InputError
        Where the baselines' items do not broadcast to x's items: Captum would
        say only that two tensors' sizes differ, as though the model failed.
    """
    given = tuple(baselines.shape)
    baselines = baselines.to(device=x.device, dtype=x.dtype)
    if baselines.dim() == 0:
        # One number for every pixel; Captum fails on a 0-d tensor (IndexError).
        return baselines.expand(1, *x.shape[1:])
    if baselines.dim() < x.dim():
        baselines = baselines.reshape(1, *baselines.shape)
    try:
        return baselines.expand(baselines.shape[0], *x.shape[1:])
    except RuntimeError:
        per_channel = (1, x.shape[1], *(1,) * (x.dim() - 2))
        raise InputError(
            f"captum:{name}: baselines of shape {given} do not broadcast to x "
            f"of shape {tuple(x.shape)}; expected a number, one colour per channel "
            f"{per_channel}, one baseline {tuple(x.shape[1:])} or one per image {tuple(x.shape)}"
        ) from None


#: Captum's notices that it sets and removes hooks around each call.
_HOOK_NOTICE = re.compile(r"\s*Setting (forward, )?backward hooks", re.IGNORECASE)


_NOTICE_LOCK = threading.Lock()
_NOTICE_USERS = 0
_NOTICE_SHOW: list = []


@contextlib.contextmanager
def _without_hook_notice() -> Iterator[None]:
    """Drop Captum's notice of its hooks as it is shown, and nothing else.

    Not ``warnings.catch_warnings``: entering and leaving it resets Python's record of
    the warnings already shown, so that a warning of the model's own forward (shown
    once by default) came again at every batch that a Captum method explained.
    Counted over threads: the first call in installs the filter, the last one out
    gives back the display it found (calls on two models from two threads overlap).
    """
    global _NOTICE_USERS

    def shown(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: object = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, UserWarning) and _HOOK_NOTICE.match(str(message)):
            return
        _NOTICE_SHOW[0](message, category, filename, lineno, file, line)

    with _NOTICE_LOCK:
        if _NOTICE_USERS == 0:
            _NOTICE_SHOW[:] = [warnings.showwarning]
            warnings.showwarning = shown
        _NOTICE_USERS += 1
    try:
        yield
    finally:
        with _NOTICE_LOCK:
            _NOTICE_USERS -= 1
            if _NOTICE_USERS == 0:
                warnings.showwarning = _NOTICE_SHOW.pop()


@register_prefix("captum")
@functools.cache
def captum_method(name: str) -> Method:
    """The explanation method ``captum:NAME``: ``captum.attr.NAME`` built on the model.

    Parameters
    ----------
    name : str
        A class of ``captum.attr`` whose ``attribute`` takes ``target``.

    Returns
    -------
    Callable
        ``method(model, x, target, *, create_graph=False, layer=None, **options)``.
        Options in the class's constructor go to it, the rest to ``attribute``.
        Layer methods return what Captum returns (the layer's shape).

    Raises
    ------
    InputError
        If Captum is not installed or ``name`` is not such a class.

    Examples
    --------
    >>> import betasmooth as bs
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> x = torch.rand(2, 1, 2, 2)
    >>> bs.explain(net, x, "captum:DeepLift", baselines=0.0).shape
    torch.Size([2, 1, 2, 2])
    >>> h = bs.explain(net, x, "beta_smooth", beta=2.0, base="captum:Occlusion",
    ...                sliding_window_shapes=(1, 1, 1))
    """
    cls = _attribution_class(name)
    required = _required(cls)
    layered = "layer" in inspect.signature(cls.__init__).parameters

    def check(model: nn.Module, **options: object) -> None:
        """Refuse, before any work, a call without an option that Captum requires."""
        missing = [option for option in required if option not in options]
        if missing:
            raise InputError(
                f"captum:{name} needs the option {missing[0]} (Captum requires it); expected "
                f"bs.explain(model, x, 'captum:{name}', {missing[0]}=...) in Python, or "
                f"--option captum:{name}.{missing[0]}=... on the command line"
            )
        if layered:
            resolve_layer(model, options.get("layer"), f"captum:{name}")

    def method(
        model: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor | None,
        *,
        create_graph: bool = False,
        layer: str | nn.Module | None = None,
        **options: object,
    ) -> torch.Tensor:
        if create_graph:
            raise InputError(
                f"captum:{name} maps are not differentiable w.r.t. x; expected create_graph=False"
            )
        check(model, layer=layer, **options)
        if options.get("return_convergence_delta"):
            # attribute would return (attributions, delta), and explain returns one map.
            raise InputError(
                f"captum:{name}: return_convergence_delta=True is not supported; expected it "
                "unset (explain returns the attributions only; Captum's "
                "compute_convergence_delta gives the delta)"
            )
        if target is None:
            target = predict(model, x)
        explainer, options = _build(cls, model, layer, options)
        baselines = options.get("baselines")
        if isinstance(baselines, tuple) and len(baselines) == 1:
            # Captum's form for models of several inputs; betasmooth's have one.
            options["baselines"] = baselines[0]
        if isinstance(options.get("baselines"), torch.Tensor):
            options["baselines"] = _broadcast(options["baselines"], x, name)
        # Captum's notice that it hooks the activations for the call (DeepLift,
        # GuidedBackprop, Deconvolution): nothing the user can act on, at every call.
        with torch.enable_grad(), _without_hook_notice():
            try:
                attribution = explainer.attribute(
                    x.detach().requires_grad_(True), target=target, **options
                )
            except InputError:
                raise  # betasmooth's own, from inside the forward (a smoothing's override)
            except (RuntimeError, AssertionError, TypeError, AttributeError, ValueError) as err:
                # Captum refuses models it cannot handle (DeepLift: a module used
                # twice; LRP: a layer without a rule) and option values it cannot
                # use (a feature_mask that is no tensor) with these; out of memory
                # stays itself, for the runs' retry.
                if is_oom(err):
                    raise  # the CPU's allocator says "can't allocate memory"
                text = str(err).strip()
                first = text.splitlines()[0] if text else type(err).__name__
                # Captum prints whole tensors into some messages.
                if "tensor(" in first:
                    first = first[: first.index("tensor(")] + "tensor(...)"
                if len(first) > 240:
                    first = first[:240].rstrip() + " ..."
                raise InputError(f"captum:{name} failed on this model: {first}") from err
        return attribution.detach()

    method.accepted_options = _accepted_options(cls)
    method.differentiable = False  # Captum's attributions are computed without a graph
    # Layer methods return the layer's shape, LimeBase its interpretable space's.
    method.shaped_like_x = False
    method.check = check  # check_model's, for a method that no CHECKS entry names
    # Input-space baselines (default 0): range_options gives them the data's black.
    if "baselines" in inspect.signature(cls.attribute).parameters:
        method.range_options = lambda low, high: {"baselines": low}
        # GradientShap's and DeepLiftShap's baselines are a set drawn from for every
        # image, whatever its size; the others' hold one baseline per image.
        if not name.endswith(("GradientShap", "DeepLiftShap")):
            method.per_item_options = frozenset({"baselines"})
    method.__name__ = f"captum_{name}"
    method.__doc__ = f"captum.attr.{name} on the model; options go to its constructor or attribute."
    return method
