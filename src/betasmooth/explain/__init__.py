"""Explanation methods behind one entry point, :func:`explain`, and one registry.

A method is a function ``fn(model, x, target, *, create_graph, **options)``
registered under its name with :func:`register`. :func:`explain` checks the
input, puts the model in evaluation mode (and restores it), normalises the
target and checks the options against the method's signature; the method
returns a tensor shaped like ``x`` (a layer method of Captum: like the
layer's output). Methods live in one file per family:
``gradient`` (gradient, input_x_gradient, integrated_gradients),
``propagation`` (guided_backprop, lrp) and ``noise`` (smoothgrad, beta_smooth).

Names of the form ``prefix:name`` are resolved by a function registered for
the prefix with :func:`register_prefix`: ``captum:DeepLift`` is any class of
``captum.attr`` (``captum`` module).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..checkpoint import reason
from ..smooth import check_smoothing_uncompiled, flush_denormals, second_order
from ..validate import (
    InputError,
    InputTypeError,
    check_form,
    check_input,
    check_instance,
    check_target,
    check_uncompiled,
    evaluating,
    one_at_a_time,
    registrar,
    warn_user,
)

__all__ = [
    "BASE_CHECKS",
    "CHECKS",
    "INPUT_CHECKS",
    "METHODS",
    "PREFIXES",
    "RESERVED",
    "check_method_input",
    "check_model",
    "explain",
    "forwards_once",
    "is_differentiable",
    "is_method",
    "method_options",
    "range_options",
    "register",
    "register_check",
    "register_input_check",
    "register_prefix",
    "select_items",
    "with_base_range",
    "wraps_base",
]

Method = Callable[..., torch.Tensor]
METHODS: dict[str, Method] = {}
PREFIXES: dict[str, Callable[[str], Method]] = {}
#: Structural checks by method name, ``check(model, **options)``: what can be
#: known to fail before any map is computed (e.g. a layer LRP has no rule for).
CHECKS: dict[str, Callable[..., None]] = {}
#: Checks of the input by method name, ``check(x, **options)``, run by
#: :func:`explain` on the ``x`` it is given (not on the noisy copies that
#: smoothgrad passes to its base, which may leave the data's range).
INPUT_CHECKS: dict[str, Callable[..., None]] = {}
#: The checks of a method that smooths a base method (:func:`wraps_base`) and
#: has none registered of its own, made for its name by the smoothing module:
#: ``"model"`` and ``"input"``, each ``make(method) -> check`` that runs the
#: base method's checks with the options that reach it.
BASE_CHECKS: dict[str, Callable[[str], Callable[..., None]]] = {}
#: Arguments that :func:`explain` passes to every method itself: never a method's option.
RESERVED = ("model", "x", "target", "create_graph")


def register(name: str, *, replace: bool = False) -> Callable[[Method], Method]:
    """Register ``fn`` as the explanation method ``name``.

    ``fn(model, x, target, *, create_graph=False, **options)`` returns the
    explanation of ``target``'s logit (``target`` a ``(B,)`` tensor, or
    ``None`` for the prediction) shaped like ``x``; with ``create_graph`` it
    must keep the graph (``torch.autograd.grad(..., create_graph=True)``),
    else attacks cannot move its map. Its keyword options are what
    :func:`explain` accepts for it. Attributes of ``fn`` say more of them:
    ``range_options`` (see :func:`range_options`) and ``per_item_options``,
    the names of options that may hold one value per image (see
    :func:`select_items`), which SmoothGrad repeats for its noisy copies, and
    ``shaped_like_x = False`` where the maps have another shape than ``x``
    (a layer's), else such a map is refused.

    Parameters
    ----------
    name : str
        Letters, digits and ``_``, as on the command line's ``--method``.
    replace : bool
        Replace a method of that name; without it a taken name is refused, so
        that a built-in is not shadowed by accident.

    Returns
    -------
    Callable
        A decorator that registers ``fn`` in :data:`METHODS` and returns it
        unchanged.

    Raises
    ------
    InputError
        The name is malformed or taken, or ``fn`` is not callable.

    Examples
    --------
    >>> @register("my_gradient")
    ... def my_gradient(model, x, target, *, create_graph=False):
    ...     ...
    >>> del METHODS["my_gradient"]
    """
    enter = registrar(METHODS, name, "explanation method", replace=replace, dash=False)

    def checked(fn: Method) -> Method:
        _check_method_form(f"explanation method {name!r}", fn)
        return enter(fn)

    return checked


#: How :func:`explain` calls a method.
METHOD_FORM = "fn(model, x, target, *, create_graph=False, **options)"


def _check_method_form(what: str, fn: object) -> None:
    check_form(what, fn, 3, ["create_graph"], METHOD_FORM)


def register_check(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``check(model, **options)``, which raises if method ``name`` cannot explain a model.

    Examples
    --------
    >>> @register_check("my_gradient")
    ... def needs_linear_head(model, **options):
    ...     if not isinstance(list(model.children())[-1], torch.nn.Linear):
    ...         raise InputError("my_gradient needs a Linear head")
    >>> del CHECKS["my_gradient"]
    """
    return registrar(CHECKS, name, "check", replace=True)


def register_input_check(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``check(x, **options)``, which raises if ``x`` is no valid input of method ``name``.

    Examples
    --------
    >>> @register_input_check("my_gradient")
    ... def needs_images(x, **options):
    ...     if x.dim() != 4:
    ...         raise InputError("my_gradient needs images (B, C, H, W)")
    >>> del INPUT_CHECKS["my_gradient"]
    """
    return registrar(INPUT_CHECKS, name, "input check", replace=True)


def check_model(model: nn.Module, method: str, **options: object) -> None:
    """Check, without computing a map, that ``method`` with ``options`` can explain ``model``.

    Catches what the structure of the model decides (LRP traces the model and
    needs a rule for every layer and function on the way), so that a long
    run fails at its start rather than after the other methods.

    Raises
    ------
    InputError
        Naming the method and what it cannot handle.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU6(), torch.nn.Linear(3, 2))
    >>> check_model(net, "lrp")
    >>> check_model(net, "beta_smooth", base="lrp", beta=2.0)
    """
    check_instance("model", model, nn.Module, "a torch.nn.Module")
    fn = _lookup(method)
    _check_options(method, options)
    # A method made on demand (captum:NAME) carries its own check.
    check = CHECKS.get(method) or getattr(fn, "check", None) or _base_check(method, "model")
    if check is not None:
        # Checked as explained: in evaluation mode (a trace fixes self.training).
        with evaluating(model):
            check(model, **options)


def check_method_input(x: torch.Tensor, method: str, **options: object) -> None:
    """Check, without computing a map, that ``x`` is an input ``method`` with ``options``
    can explain: the input check registered for it (:func:`register_input_check`),
    which :func:`explain` runs on every call.

    Examples
    --------
    >>> check_method_input(torch.rand(2, 1, 8, 8), "lrp", low=0.0, high=1.0)
    >>> check_method_input(torch.full((2, 1, 8, 8), 5.0), "lrp", low=0.0, high=1.0)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: x lies outside the lrp input box [0.0, 1.0] ...
    """
    check = INPUT_CHECKS.get(method) or _base_check(method, "input")
    if check is not None:
        check(x, **options)


def _base_check(method: str, kind: str) -> Callable[..., None] | None:
    """The check of ``kind`` of a method that smooths a base one: its base method's."""
    make = BASE_CHECKS.get(kind)
    return make(method) if make is not None and wraps_base(method) else None


def register_prefix(
    prefix: str, *, replace: bool = False
) -> Callable[[Callable[[str], Method]], Callable[[str], Method]]:
    """Register ``resolve(name) -> method`` for the method names ``prefix:name``.

    A method that takes ``**options`` checks its options itself, or lists
    the names it accepts in its attribute ``accepted_options`` (a set), which
    :func:`explain` then checks. The name after the prefix has no ``-``, as
    a registered name (refused when it is resolved). A method whose maps come
    back detached sets ``differentiable = False``, so that the attack refuses
    it by name (:func:`is_differentiable`); every other one can be attacked.

    Parameters
    ----------
    prefix : str
        The part before ``:``.
    replace : bool
        Replace the resolver of that prefix (``captum``'s, say); without it a
        taken prefix is refused.

    Raises
    ------
    InputError
        As :func:`register`: a malformed or taken prefix, or ``resolve`` not callable.

    Examples
    --------
    >>> @register_prefix("scaled")
    ... def scaled(name):
    ...     def method(model, x, target, *, create_graph=False):
    ...         return float(name) * x
    ...     return method
    >>> explain(torch.nn.Flatten(), torch.ones(1, 2), "scaled:3", target=0)
    tensor([[3., 3.]])
    >>> del PREFIXES["scaled"]
    """
    return registrar(PREFIXES, prefix, "method prefix", replace=replace, dash=False)


def is_method(method: object) -> bool:
    """Whether ``method`` is a registered name or has a registered prefix.

    Examples
    --------
    >>> is_method("gradient"), is_method("captum:Saliency"), is_method("saliency")
    (True, True, False)
    """
    if not isinstance(method, str):
        return False
    return method in METHODS or (":" in method and method.split(":", 1)[0] in PREFIXES)


def is_differentiable(method: str) -> bool:
    """Whether the maps of ``method`` can be differentiated w.r.t. the input, so that
    it can be attacked: every method but one whose function sets the attribute
    ``differentiable = False`` (as ``captum:NAME`` does, whose maps are detached).

    Examples
    --------
    >>> is_differentiable("lrp"), is_differentiable("captum:Saliency")
    (True, False)
    """
    return bool(getattr(_lookup(method), "differentiable", True))


def forwards_once(method: str) -> bool:
    """Whether the map of ``method`` comes from one plain forward pass of the model on
    ``x`` itself, so that the attack can reuse that pass's logits for its output term:
    a method whose function sets the attribute ``own_forward = True`` (as ``gradient``
    and ``input_x_gradient`` do). Others (noisy or scaled copies, modified or smoothed
    ReLUs, LRP's own pass) leave the output term to a forward of its own.

    Examples
    --------
    >>> forwards_once("gradient"), forwards_once("smoothgrad")
    (True, False)
    """
    return bool(getattr(_lookup(method), "own_forward", False))


def method_options(method: str) -> dict[str, object]:
    """The options of ``method`` with their defaults.

    Examples
    --------
    >>> method_options("beta_smooth")
    {'base': 'gradient', 'base_options': None, 'beta': 1.0}
    """
    fn = _lookup(method)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in RESERVED
    }


def wraps_base(method: str) -> bool:
    """Whether ``method`` smooths a base method (it has the option ``base``), as
    ``smoothgrad`` and ``beta_smooth`` do: a defense, attacked adaptively and swept on its base.

    Examples
    --------
    >>> wraps_base("smoothgrad"), wraps_base("lrp")
    (True, False)
    """
    return "base" in method_options(method)


def _base_of(method: str, options: Mapping[str, object]) -> str | None:
    """The registered method that ``method`` smooths with ``options`` (its ``base``
    option, else its default), or None for a method that smooths none."""
    known = method_options(method)
    base = options.get("base", known.get("base")) if "base" in known else None
    return base if isinstance(base, str) and is_method(base) else None


def range_options(
    low: torch.Tensor | float, high: torch.Tensor | float, methods: Iterable[str] = ()
) -> dict[str, dict[str, object]]:
    """Options that make the methods respect the data's range ``[low, high]`` (per channel).

    Each method that has an attribute ``range_options``, ``fn(low, high) ->
    options``, says which: LRP's z^B rule takes the bounds, SmoothGrad's
    noise level is relative to ``high - low``, and integrated gradients starts
    from ``low``: the black image, as zero is on [0, 1] data (on normalised
    data zero is the mean colour). Every registered method is asked, and each
    of ``methods`` (``captum:NAME`` is resolved there: one whose ``attribute``
    takes ``baselines``, ``IntegratedGradients``, ``DeepLift``,
    ``GradientShap``, ``FeatureAblation``, ..., gets the black baseline, as
    its default baseline is 0 too). A method registered with
    :func:`register` takes part by setting the attribute.
    The runs of :mod:`betasmooth.runs` (the command line) take them all as
    ``method_options``; :func:`~betasmooth.manipulate`,
    :func:`~betasmooth.defense_sweep` and :func:`~betasmooth.calibrate_beta`
    take every method's but SmoothGrad's (whose noise level follows each
    item's range there) from their ``data_range``.

    Examples
    --------
    >>> opts = range_options(torch.tensor([-2.0]).view(1, 1, 1, 1), 2.0)
    >>> sorted(opts), float(opts["smoothgrad"]["input_range"])
    (['integrated_gradients', 'lrp', 'smoothgrad'], 4.0)
    """
    options: dict[str, dict[str, object]] = {}
    for method in dict.fromkeys([*METHODS, *methods]):
        given = getattr(_lookup(method), "range_options", None)
        if given is not None:
            options[method] = dict(given(low, high))
    return options


def select_items(
    method: str, options: Mapping[str, object], indices: Sequence[int], shape: Sequence[int]
) -> dict[str, object]:
    """``options`` of ``method`` for the images ``indices`` of a set of ``shape`` (N, ...).

    A method that has an attribute ``per_item_options``, a set of option names,
    says which of its options may hold one value per image: integrated
    gradients' ``baseline``, LRP's ``low`` and ``high``, Captum's ``baselines``
    (but GradientShap's and DeepLiftShap's, a set to draw from). Such an option
    with the set's rank and ``N`` as first dimension is cut to the rows of
    ``indices``, also where it goes to the base method of ``smoothgrad`` or
    ``beta_smooth``; the runs of :mod:`betasmooth.runs` explain a set in
    batches this way.

    Examples
    --------
    >>> baseline = torch.arange(4.0).view(4, 1, 1, 1)
    >>> cut = select_items("integrated_gradients", {"baseline": baseline}, [3, 1], (4, 1, 8, 8))
    >>> cut["baseline"].flatten().tolist()
    [3.0, 1.0]
    """
    chosen = dict(options)
    names = set(getattr(_lookup(method), "per_item_options", ()))
    base = _base_of(method, options)
    if base is not None:
        of_base = set(getattr(_lookup(base), "per_item_options", ()))
        names |= of_base - set(method_options(method))
        if isinstance(options.get("base_options"), Mapping):
            chosen["base_options"] = _rows(options["base_options"], of_base, indices, shape)
    return _rows(chosen, names, indices, shape)


def _rows(
    options: Mapping[str, object], names: set[str], indices: Sequence[int], shape: Sequence[int]
) -> dict[str, object]:
    return {
        name: _map_items(
            value, shape, lambda rows: rows[torch.as_tensor(list(indices), device=rows.device)]
        )
        if name in names
        else value
        for name, value in options.items()
    }


def _map_items(
    value: object, shape: Sequence[int], fn: Callable[[torch.Tensor], torch.Tensor]
) -> object:
    """``fn`` applied to ``value`` where it has one row per item of a batch of ``shape``.

    Such a value is a tensor of the batch's rank whose first dimension is the
    batch's, of more than one item (a single item's value broadcasts as it
    is), or a tuple of them, as Captum takes its baselines; anything else is
    returned as it is.
    """
    if isinstance(value, tuple):
        return tuple(_map_items(part, shape, fn) for part in value)
    holds_items = (
        torch.is_tensor(value)
        and shape[0] > 1
        and value.dim() == len(shape)
        and value.shape[0] == shape[0]
    )
    return fn(value) if holds_items else value


def with_base_range(
    method: str,
    options: Mapping[str, object],
    low: torch.Tensor | float,
    high: torch.Tensor | float,
) -> dict[str, object]:
    """``options`` of ``method`` with the range options of its base method put into
    ``base_options``: the box of a base ``lrp``, the black baseline of a base
    ``integrated_gradients`` (``base`` of ``smoothgrad`` and ``beta_smooth``).

    An option already given, in ``base_options`` or among ``options``, wins.

    Examples
    --------
    >>> opts = with_base_range("beta_smooth", {"base": "lrp"}, -1.0, 1.0)
    >>> opts["base_options"]
    {'low': -1.0, 'high': 1.0}
    """
    options = dict(options)
    base = _base_of(method, options)
    if base is None:
        return options
    ranged = range_options(low, high, methods=[base]).get(base, {})
    given = options.get("base_options")
    if not ranged or (given is not None and not isinstance(given, dict)):
        return options  # nothing to fill; the method itself names a wrong base_options
    inner = dict(given or {})
    fill = {k: v for k, v in ranged.items() if k not in inner and k not in options}
    if fill:
        options["base_options"] = {**inner, **fill}
    return options


def _lookup(method: str) -> Method:
    if not is_method(method):
        prefixed = ", ".join(f"{prefix}:NAME" for prefix in sorted(PREFIXES))
        raise InputError(
            f"unknown method {method!r}; expected one of: {', '.join(sorted(METHODS))}"
            + (f", or {prefixed}" if prefixed else "")
        )
    if method in METHODS:
        return METHODS[method]
    if "-" in method:
        # The name after a prefix goes into file names as a registered name does:
        # arrays files are [sweep-]<method>-<index>.npz.
        raise InputError(
            f"method names have no '-' (run directories name files <method>-<index>); "
            f"got {method!r}, expected e.g. {method.replace('-', '_')!r}"
        )
    prefix, name = method.split(":", 1)
    try:
        fn = PREFIXES[prefix](name)
    except InputError:
        raise
    except Exception as err:
        # A resolver's own refusal of a name, in whatever form it raises it.
        raise InputError(
            f"method prefix {prefix!r} cannot resolve {name!r}: {reason(err)}"
        ) from err
    _check_method_form(f"the method that prefix {prefix!r} resolves {name!r} to", fn)
    return fn


def _takes_any(fn: Method) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def _check_options(method: str, options: dict[str, object], owner: str | None = None) -> None:
    # ``owner``: the smoothing method (smoothgrad, beta_smooth) that passes on to
    # its base ``method`` the options it does not take itself.
    fn = _lookup(method)
    if _takes_any(fn):
        # Such a method checks its options itself, unless it lists them (as
        # captum:NAME does), so that a typo is named before any work.
        known = getattr(fn, "accepted_options", None)
        if known is None:
            return
    else:
        known = method_options(method)
    unknown = sorted(set(options) - set(known))
    if not unknown:
        return
    expected = ", ".join(sorted(known)) or "(none)"
    # explain's own argument is called method: Captum's option of that name is rule here.
    hint = " (Captum's option method is written rule)" if unknown[0] == "method" else ""
    if owner is None and not known:
        raise InputTypeError(
            f"unknown option {unknown[0]!r} for method {method!r}, which takes no options"
        )
    if owner is None:
        raise InputTypeError(
            f"unknown option {unknown[0]!r} for method {method!r}; expected some of: "
            f"{expected}{hint}"
        )
    own = ", ".join(sorted(method_options(owner)))
    raise InputTypeError(
        f"unknown option {unknown[0]!r} for method {owner!r}; expected some of its own "
        f"({own}) or of its base {method!r} ({expected.strip('()')}){hint}"
    )


@one_at_a_time
def explain(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    target: int | torch.Tensor | None = None,
    *,
    create_graph: bool = False,
    **options: object,
) -> torch.Tensor:
    """Explain the logit of ``target`` for each item of the batch ``x``.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits of shape ``(B, classes)``. It is run in
        evaluation mode; its mode is restored afterwards.
    x : torch.Tensor
        Floating batch, e.g. ``(B, C, H, W)``, on the model's device; float32
        and float64 are cast to the model's dtype (the map comes back in
        ``x``'s dtype). Checked by :func:`betasmooth.validate.check_input`.
    method : str
        One of ``gradient``, ``input_x_gradient``, ``integrated_gradients``,
        ``guided_backprop``, ``lrp``, ``smoothgrad``, ``beta_smooth``, or
        ``captum:NAME`` for any Captum method.
    target : None, int, sequence of int, torch.Tensor or numpy.ndarray
        Class to explain: ``None`` for the predicted class, an int for all
        items, or ``(B,)`` integers (a tensor, an array or a list).
    create_graph : bool
        Keep the graph so that the map is differentiable w.r.t. ``x`` (pass
        an ``x`` that requires grad).
    **options
        Method options, e.g. ``steps`` for integrated gradients or ``beta``
        for beta_smooth; :func:`method_options` lists them.

    Returns
    -------
    torch.Tensor
        The explanation, shaped like ``x``; a Captum layer method's
        (``captum:LayerGradCam``) is shaped like the layer's output.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, y = bs.load_data("digits")
    >>> h = bs.explain(model, x[:8], "gradient")
    >>> h.shape
    torch.Size([8, 1, 32, 32])
    """
    fn = _lookup(method)
    _check_options(method, options)
    check_instance("create_graph", create_graph, bool, "True or False")
    if create_graph:
        check_uncompiled(model, "create_graph=True")
    # Before check_input, which runs the model once.
    check_smoothing_uncompiled(model)
    given = x
    x = check_input(model, x)
    target_t = check_target(target, x.shape[0])
    if target_t is not None:
        target_t = target_t.to(x.device)
    check_method_input(x, method, **options)
    # Subnormal floats flushed: beta_smooth at beta 50 makes them, and the CPU is
    # slow on them (see flush_denormals).
    # A map with a graph is differentiated again (the attack).
    with evaluating(model), flush_denormals(), second_order(create_graph):
        out = fn(model, x, target_t, create_graph=create_graph, **options)
    out = _checked_output(out, method, fn, x, options)
    if not create_graph:  # the attack's steps: their maps were checked before it
        _check_finite(out, method)
        _warn_if_zero(out, method, model)
    return out.to(given.dtype)


def _check_finite(out: torch.Tensor, method: str) -> None:
    """Refuse a map with NaN or inf, which every comparison would carry on silently."""
    bad = ~torch.isfinite(out.detach()).flatten(1).all(1)
    if not bool(bad.any()):
        return
    items = bad.nonzero().flatten().tolist()
    named = ", ".join(map(str, items[:5])) + (", ..." if len(items) > 5 else "")
    hint = (
        "float16's largest value, 65504, is too small for the method's arithmetic: "
        "expected model.float() or model.bfloat16()"
        if out.dtype == torch.float16
        else "expected a model whose outputs and gradients are finite on x"
    )
    raise InputError(
        f"{method} gave NaN or inf in the map of {len(items)} of {len(out)} item(s) "
        f"(index {named}) in {str(out.dtype).removeprefix('torch.')}; {hint}"
    )


def _warn_if_zero(out: torch.Tensor, method: str, model: nn.Module) -> None:
    """Say once per model and method that a map is zero everywhere: compared with
    another (a target, a defended map), it scores as perfect agreement."""
    if bool((out.detach().flatten(1) == 0).all(1).any()):
        warn_user(
            f"{method} gave a map that is zero everywhere: nothing in x moves the explained "
            "logit (an untrained or zero-initialised classifier head, every unit off), "
            "the logit is far below a rule's stabiliser (LRP divides by sums plus 1e-6 "
            "or epsilon), or x is the method's baseline; a comparison of such maps says "
            "nothing (two constant maps have PCC 1)",
            model,
        )


def _checked_output(
    out: object, method: str, fn: Method, x: torch.Tensor, options: Mapping[str, object]
) -> torch.Tensor:
    """A method's result, refused in one line unless it is shaped like ``x``, or, for a
    method (or base) whose ``shaped_like_x`` is False, a batch of ``x``'s size."""
    free = not getattr(fn, "shaped_like_x", True)
    if not free and (base := _base_of(method, options)) is not None:
        free = not getattr(_lookup(base), "shaped_like_x", True)
    if isinstance(out, torch.Tensor) and (
        out.shape == x.shape if not free else out.dim() >= 2 and out.shape[0] == x.shape[0]
    ):
        return out
    got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
    expected = (
        f"a batch of {x.shape[0]} maps (x has shape {tuple(x.shape)})"
        if free
        else f"a tensor shaped like x {tuple(x.shape)} (a method whose maps have other "
        "shapes, such as a layer's, sets its attribute shaped_like_x = False)"
    )
    raise InputError(f"method {method!r} returned {got}; expected {expected}")


# Importing the families fills the registry.
from . import captum, composites, gradient, noise, propagation, transformer  # noqa: E402, F401
