"""Stage and method declarations and the method registry.

A method (``raydebias/methods/<name>/__init__.py``) declares the shared building-block stages it needs, its own
stages and what evaluate should score, then calls :func:`register`. It names its stage functions with :func:`ref`
(imported at their first call), so registering every method — which validating a config does — imports only the
declarations and their config blocks, no algorithm code. ``raydebias.pipeline.build_graph`` asks the registry for the
run's methods and sorts their stages topologically; nothing here imports a method (docs/architecture.md, "Add a
method").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel

if TYPE_CHECKING:
    from raydebias.config import RunConfig
    from raydebias.core.context import RunContext, StageResult

# methods outside this package: ``[project.entry-points."raydebias.methods"] name = "pkg.module"``
ENTRY_POINT_GROUP = "raydebias.methods"

# the ``stages:`` kinds of the building blocks every method may share (``raydebias.methods.shared``); the methods
# add their own (``Method.kinds``); every classifier trains in a ``train`` stage, then evaluate and report
BUILDING_BLOCKS = ("data", "clip", "embed", "cluster", "diffusion", "class_diffusion")
FINAL_KINDS = ("train", "evaluate", "report")


@dataclass(frozen=True)
class Ref:
    """A function named ``"package.module:name"``; calling the ref imports the module (once: Python caches it) and
    calls the function. Two refs to one function are equal, so evaluate runs a shared ``Method.evaluate`` once."""

    target: str

    def __post_init__(self):
        if self.target.count(":") != 1:
            raise ValueError(f"ref {self.target!r}: expected 'package.module:function'")

    def resolve(self) -> Callable[..., Any]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


def ref(target: str) -> Ref:
    """``ref("raydebias.methods.tiw.stages:run_tiw")``: the function, imported when first called."""
    return Ref(target)


@dataclass(frozen=True)
class Stage:
    """One node of the run graph.

    ``kind`` is the ``stages:`` entry that switches it on (``train`` for every ``train/<method>``). Its cache key
    hashes ``reads`` — config paths such as ``"train"``, ``"models.classifier"`` or ``"seed"``, a leading ``-``
    removes a path (``"-train.epochs"``) — with the fields marked as resources (worker counts, CPUs per task)
    left out, plus ``key(cfg)`` when a stage reads more than config (e.g. a weights fingerprint).
    """

    name: str
    kind: str
    deps: tuple[str, ...]
    run: Callable[[RunContext], StageResult]
    reads: tuple[str, ...] = ()
    key: Callable[[RunConfig], Any] | None = None

    def config_key(self, cfg: RunConfig) -> Any:
        out = config_key(cfg, self.reads)
        if self.key is not None:
            out["_key"] = self.key(cfg)
        return out


@dataclass(frozen=True)
class SyntheticSet:
    """A set of generated images a method writes, for the fidelity probes of ``evaluate``.

    ``target``: ``group`` (rows carry ``label`` and ``bias``), ``class`` (``label`` only), ``style`` (``label``
    from the content row, bias of the ``style_id`` training row), ``pseudo`` (a labeller's ``label``) or
    ``samples`` (unlabelled ``samples_*.npy``). ``cas``: also train a classifier on it alone (CAS)."""

    name: str
    path: str
    target: str
    cas: bool


@dataclass(frozen=True)
class Method:
    """A debiasing method: ``stages(cfg)`` are its own nodes; ``shared`` names the building-block stages it needs
    (``clip``, ``embed``, ``cluster``, ``diffusion``, ``class_diffusion``); ``train/<name>`` is the node whose classifier
    evaluate scores; a generation-only method (``classifier=False``) names its ``result`` node instead. ``stats``
    are stages whose ``stats.json`` evaluate copies into ``metrics.json["generation"]``; ``doc`` is its page.
    ``report(run_dir, info, metrics, samples_per_group)`` returns its report sections (HTML), ``evaluate(ctx, info)``
    what it adds to ``metrics.json`` beyond the rows; a function shared by two methods runs once.

    ``config`` = (block name, pydantic model): the method's config block, the YAML key ``RunConfig`` validates
    with that model (two methods may share one block); ``pretrained`` names the ``models.<name>`` weights its
    stages load under ``models.source: pretrained``; ``check(cfg)`` raises ``ValueError`` for a config this method
    cannot run (checked when the config is validated). ``kinds`` are the ``stages:`` entries its own stages use
    (a new kind is declared here and nowhere else); ``console(metrics)`` returns the lines ``raydebias run`` prints
    for it under the results table (a generation-only method has no row there)."""

    name: str
    stages: Callable[[RunConfig], list[Stage]]
    kinds: tuple[str, ...] = ("train",)
    shared: tuple[str, ...] = ()
    config: tuple[str, type[BaseModel]] | None = None
    pretrained: tuple[str, ...] = ()
    check: Callable[[RunConfig], None] | None = None
    synthetic: tuple[SyntheticSet, ...] = ()
    stats: tuple[str, ...] = ()
    classifier: bool = True
    result: str | None = None
    report: Callable[..., list[str]] | None = None
    evaluate: Callable[..., dict[str, Any]] | None = None
    console: Callable[[dict[str, Any]], list[str]] | None = None
    doc: str = ""

    @property
    def result_node(self) -> str:
        """The node evaluate waits for: ``train/<name>``, or ``result`` for a generation-only method."""
        return f"train/{self.name}" if self.classifier else (self.result or self.name)


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _METHODS:
        load_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"no method {name!r} registered; have {sorted(_METHODS)}") from None


def registered() -> list[str]:
    """Every method's name (the method modules are discovered first: :func:`load_methods`)."""
    load_methods()
    return list(_METHODS)


def stage_kinds() -> list[str]:
    """Every entry ``stages:`` may list, in the order a config shows them: the building blocks, each registered
    method's ``kinds`` (in registration order), then train, evaluate and report."""
    load_methods()
    out = list(BUILDING_BLOCKS)
    for m in _METHODS.values():
        out += [k for k in m.kinds if k not in out and k not in FINAL_KINDS]
    return out + list(FINAL_KINDS)


_LOADED = False


def load_methods() -> None:
    """Import every method module once: the modules of ``raydebias.methods`` and those named by the
    ``raydebias.methods`` entry point group (so a method can live in another package). Config validation calls
    this, so a process that only validates a config (a Ray worker) knows every method's block too."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    importlib.import_module("raydebias.methods")  # discovers its own modules (raydebias/methods/__init__.py)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(ep.value)


def method_blocks() -> dict[str, type[BaseModel]]:
    """Config block name → its model, over every registered method (one model per name)."""
    out: dict[str, type[BaseModel]] = {}
    for m in _METHODS.values():
        if m.config is None:
            continue
        name, model = m.config
        if out.setdefault(name, model) is not model:
            raise ValueError(f"config block {name!r} is declared twice with different models "
                             f"({out[name].__name__}, {model.__name__})")
    return out


def _keyed(value: Any) -> Any:
    """A config value for a cache key: models dumped without their resource fields."""
    if isinstance(value, BaseModel):
        out = {}
        for name, f in type(value).model_fields.items():
            if (f.json_schema_extra or {}).get("resource"):
                continue
            out[name] = _keyed(getattr(value, name))
        return out
    if isinstance(value, (list, tuple)):
        return [_keyed(v) for v in value]
    if isinstance(value, dict):
        return {k: _keyed(v) for k, v in value.items()}
    return value


def config_key(cfg: RunConfig, reads: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The part of ``cfg`` named by ``reads`` (see :class:`Stage`), resource fields left out."""
    out: dict[str, Any] = {}
    for path in reads:
        if path.startswith("-"):
            continue
        value: Any = cfg
        for part in path.split("."):
            value = getattr(value, part)
        out[path] = _keyed(value)
    for path in reads:
        if not path.startswith("-"):
            continue
        parts = path[1:].split(".")
        for i in range(len(parts) - 1, 0, -1):  # the longest read prefix that holds it
            head = ".".join(parts[:i])
            if head in out:
                node = out[head]
                for p in parts[i:-1]:
                    node = node[p]
                if parts[-1] not in node:
                    raise KeyError(f"{path}: no field {parts[-1]!r}")
                del node[parts[-1]]
                break
        else:
            raise KeyError(f"{path}: not inside any path the stage reads ({[r for r in reads if r[0] != '-']})")
    return out


def toposort(stages: list[Stage]) -> list[Stage]:
    """Dependency order, ties kept in declaration order; dependencies outside ``stages`` are ignored here
    (``check_graph`` requires them to have completed in an earlier run)."""
    names = {s.name for s in stages}
    done: set[str] = set()
    order: list[Stage] = []
    pending = list(stages)
    while pending:
        for s in pending:
            if all(d in done or d not in names for d in s.deps):
                order.append(s)
                done.add(s.name)
                pending.remove(s)
                break
        else:
            raise ValueError(f"dependency cycle among {[s.name for s in pending]}")
    return order
