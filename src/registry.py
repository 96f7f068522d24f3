"""Every merge method, in one explicit list: its paper, formula, the space it works in, its parameters (default,
grid searched on validation rows, accepted range) and where its function is. mergekit's idea: a method declares its
own parameters. Nothing here imports torch or a model: the reports read this table without them, and a method's
function (src/merges.py for the data-free ones, src/merge_fit.py for those that learn from rows, src/lora.py for the
paper's three) is imported when it first runs.

Adding a method: write its function, then add its `Method(...)` to `METHODS` below (the order is the tables' order).
tests/test_registry.py then checks it with every other method.
"""
import importlib
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Callable

from .errors import BadInput
from .settings import Setting

# ------------------------------------------------------------------------------------------------ the entries
@dataclass(frozen=True)
class Param:
    """A method's parameter: its default, its grid, and the values it accepts (a finite number of `kind` within
    [low, high], an end excluded where `open` names it; None only where `none_ok`)."""
    default: object
    help: str
    grid: tuple = ()          # candidates tried on validation rows by evaluation (lowest loss wins); () keeps default
    low: float | None = None
    high: float | None = None
    open: str = ""            # "low", "high" or "low,high": the ends excluded from the range
    kind: type = float
    none_ok: bool = False     # None is a value (TSV-M's fraction, CAT's init: "derive it from n")

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return (f"{'(' if 'low' in self.open or self.low is None else '['}{lo}, {hi}"
                f"{')' if 'high' in self.open or self.high is None else ']'}")

    def check(self, method: str, name: str, value):
        """`value` as the parameter's kind, or BadInput naming the parameter, its range and the value."""
        if value is None:
            if self.none_ok:
                return None
            raise BadInput(f"{method}.{name} needs a value in {self.range_text()}")
        try:
            if isinstance(value, bool):  # True would pass as 1
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise BadInput(f"{method}.{name}={value!r} is not a number: give a value in {self.range_text()}") from None
        bad = not Setting(float, self.low, self.high, self.open).in_range(number)   # the one range check
        if self.kind is int and not bad and number != int(number):
            raise BadInput(f"{method}.{name}={value!r} must be a whole number in {self.range_text()}")
        if bad:
            raise BadInput(f"{method}.{name}={value!r} is out of range: {name} must be in {self.range_text()}"
                           + ("" if math.isfinite(number) else " (a finite number)"))
        return self.kind(number)


@dataclass(frozen=True)
class Method:
    name: str
    paper: str                # one line: authors, venue
    formula: str              # one line, for the README table and --help
    space: str                # "factors" (per module, on the factors), "core", "dense", or "data" (needs rows)
    fn: str                   # where the function is, "module.function" in src (imported when first run):
                              # factors: (loras, **p) -> Lora; core/dense: (M, w, ctx, **p) -> M; data: see merge_fit
    params: dict = field(default_factory=dict)   # name -> Param
    output: str = "exact, rank R"
    exact: str = ""           # core result against the dense definition: "equal" or what differs
    default: bool = True      # in evaluation's default --methods
    mean: bool = False        # per-task weights default to 1/n (not 1)
    seeded: bool = False      # draws random numbers (DARE's masks): takes merge's `seed`
    identity: dict | None = None  # parameters under which one adapter in gives it back (None: never, by definition)
    equal_ranks: bool = False     # sums the factors themselves, so every adapter must have the same rank and scale
    entrywise: bool = False   # acts on the cores' entries (trim, masks), so needs the singular bases (`core_project`)

    @property
    def function(self) -> Callable:
        module, _, name = self.fn.rpartition(".")
        return getattr(importlib.import_module(f".{module}", __package__), name)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise BadInput(f"unknown merge {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]


RANK_SUFFIX = re.compile(r"(.+)_r([1-9][0-9]*)")


def split_rank(name: str) -> tuple[str, int | None]:
    """A rank variant's name, `<method>_r<k>` (regmean_r8, ties_r16): the registered method and the rank k its merge
    is truncated to (`truncate`, or the method's own `rank`); any other name: itself and None."""
    found = RANK_SUFFIX.fullmatch(name)
    if found and found[1] in METHODS:
        return found[1], int(found[2])
    return name, None


def is_merge(name: str) -> bool:
    """A registered merge or a rank variant of one."""
    return split_rank(name)[0] in METHODS


def resolve_params(method: Method, given: dict) -> dict:
    """The method's parameters: its defaults, overridden by `given` (None means "the default")."""
    unknown = sorted(set(given) - set(method.params))
    if unknown:
        raise BadInput(f"merge {method.name} has no parameter {', '.join(unknown)}: it takes "
                       f"{', '.join(method.params) or 'none'}")
    return {k: p.check(method.name, k, given[k] if given.get(k) is not None else p.default)
            for k, p in method.params.items()}


def check_rank(rank):
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise BadInput(f"rank={rank!r}: give a whole number >= 1")


def one_rank(name: str, given: dict) -> int | None:
    """The one rank merge `name` is truncated to, from wherever ranks were given ({where: rank or None}, e.g.
    {"--methods ties_r16": 16, "--rank 8": 8}); None when none was. Two different ranks are refused, naming where
    each came from, before any work."""
    ranks = {where: r for where, r in given.items() if r is not None}
    for r in ranks.values():
        check_rank(r)
    if len(set(ranks.values())) > 1:
        raise BadInput(f"{name}: two ranks ({', '.join(f'{where}: {r}' for where, r in ranks.items())}): give one")
    return next(iter(ranks.values()), None)


# ------------------------------------------------------------------------------------------------ the methods
LAMBDA_SUM = (0.125, 0.25, 0.5, 1.0)      # methods that add n updates: a good lambda can be near 1/n
LAMBDA_ONE = (0.5, 1.0, 1.5, 2.0)         # methods that average (disjoint means): lambda near 1


def _scale(default=1.0, grid=LAMBDA_SUM, what="scale of the merged update"):
    return Param(default, what, grid)


def _density(default=0.2, what="share of entries kept per task"):
    return Param(default, what, low=0.0, high=1.0, open="low")


def _drop(default=0.9):
    return Param(default, "drop probability", low=0.0, high=1.0, open="high")


# RegMean's parameters; RegMean++ shares them but the memory budget (it holds one block's statistics)
REGMEAN_PARAMS = {
    "rows": Param(128, "training rows per adapter whose layer inputs make its Gram matrices", low=1, kind=int),
    "alpha": Param(0.9, "scale of the Gram matrices' off-diagonal entries (1: plain least squares; towards 0: each "
                        "input feature weighted by its share of the summed energy)", grid=(0.1, 0.5, 0.9, 1.0),
                   low=0.0, high=1.0, open="low"),
    "memory": Param(None, "GB the summed Gram statistics may hold (default: 80 percent of the memory free after the "
                          "model loads); when they do not fit, they are collected for a group of layers per pass "
                          "over the rows", low=0.0, open="low", none_ok=True),
    "rank": Param(None, "rank of the merged LoRA (None: exact, rank R = sum_i r_i): RegMean's best LoRA of that "
                        "rank, the truncation in the metric of G' (not the plain SVD's)", low=1, kind=int,
                  none_ok=True)}


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("concat", "the thesis (Lee, UNIST): concatenation", "sum_i s_i B_i A_i (all LoRAs at once)",
                "factors", "lora.concat", {}, "exact, rank R", identity={}),
    Method("weight_sum", "the thesis: weight summing (its \"weighted\")",
                "s (sum_i B_i)(sum_i A_i): the factors summed, with the cross terms B_i A_j", "factors", "lora.weight_sum",
                {}, "exact, rank r", identity={}, equal_ranks=True),
    Method("weighted_avg", "the thesis log's \"weighted_avg\"", "s (mean_i B_i)(mean_i A_i)", "factors",
                "lora.weighted_avg", {}, "exact, rank r", default=False, identity={}, equal_ranks=True),
    Method("svd", "the thesis: SVD merge", "rank-8 truncated SVD of mean_i s_i B_i A_i", "factors",
                "lora.svd_merge", {"rank": Param(8, "rank of the truncation", low=1, kind=int)},
                "rank-k truncation (exact)", "equal", mean=True, identity={}),
    Method("task_arithmetic", "Ilharco et al., ICLR 2023", "lambda sum_i D_i", "core", "merges.task_arithmetic",
                {"lam": _scale()}, exact="equal", identity={"lam": 1.0}),
    Method("ties", "Yadav et al., NeurIPS 2023", "lambda disjoint_mean(trim(D_i, density)) (on the cores)", "core",
                "merges.ties", {"density": _density(), "lam": _scale(1.0, LAMBDA_ONE)},
                exact="entry-wise on the R x R cores: differs from ties_dense by design", entrywise=True,
                identity={"density": 1.0, "lam": 1.0}),
    Method("ties_dense", "Yadav et al., NeurIPS 2023 (on the dense d_out x d_in updates)",
                "lambda disjoint_mean(trim(D_i, density)) (dense)", "dense", "merges.ties",
                {"density": _density(), "lam": _scale(1.0, LAMBDA_ONE)},
                "dense update (folded; as an adapter, rank d_in)", "is the dense definition", default=False,
                identity={"density": 1.0, "lam": 1.0}),
    Method("dare_linear", "Yu et al., ICML 2024", "lambda sum_i DARE(D_i, p) (on the cores, seeded)", "core",
                "merges.dare_linear", {"p": _drop(), "lam": _scale()},
                exact="entry-wise on the cores: differs from dense DARE by design", seeded=True, entrywise=True,
                identity={"p": 0.0, "lam": 1.0}),
    Method("dare_ties", "Yu et al., ICML 2024", "lambda disjoint_mean(DARE(D_i, p)) (on the cores, seeded)",
                "core", "merges.dare_ties", {"p": _drop(), "lam": _scale(1.0, LAMBDA_ONE)},
                exact="entry-wise on the cores: differs from dense DARE-TIES by design", seeded=True, entrywise=True,
                identity={"p": 0.0, "lam": 1.0}),
    Method("magnitude_prune", "magnitude pruning (Yadav et al.'s trim, then the sum)",
                "lambda sum_i trim(D_i, density) (on the cores)", "core", "merges.magnitude_prune",
                {"density": _density(), "lam": _scale(1.0, (0.25, 0.5, 1.0, 2.0))},
                exact="entry-wise on the cores: differs from dense pruning by design", entrywise=True,
                identity={"density": 1.0, "lam": 1.0}),
    Method("knots_ties", "Stoica et al., ICLR 2025 (KnOTS-TIES)",
                "U lambda disjoint_mean(trim(S V_i^T)), [D_1..D_n] = U S [V_1..V_n]^T", "core",
                "merges.knots_ties",
                {"density": _density(1.0, "share of block entries kept (KnOTS's LLaMA config: 1.0)"),
                 "lam": _scale(1.0, LAMBDA_ONE)},
                exact="TIES on the blocks of the core: differs from dense KnOTS by design (with a plain sum: equal)", entrywise=True,
                identity={"density": 1.0, "lam": 1.0}),
    Method("knots_dare_ties", "Stoica et al., ICLR 2025 (KnOTS-DARE-TIES)",
                "U lambda disjoint_mean(DARE(S V_i^T, p))", "core",
                "merges.knots_dare_ties",
                {"p": _drop(), "lam": _scale(1.0, LAMBDA_ONE)},
                exact="DARE on the blocks of the core: differs from dense KnOTS by design", seeded=True, entrywise=True,
                identity={"p": 0.0, "lam": 1.0}),
    Method("tsv_m", "Gargiulo et al., CVPR 2025 (TSV-M)",
                "alpha polar([U_i,k]) diag(S) polar([V_i,k])^T, top k = R/n components per task", "core", "merges.tsv_m",
                {"fraction": Param(None, "share of the R-dim space per task (None: 1/n)", low=0.0, high=1.0,
                                   open="low", none_ok=True),
                 "alpha": _scale(1.0, (0.25, 0.5, 1.0, 2.0))}, exact="equal", identity={"alpha": 1.0}),
    Method("iso_c", "Marczak et al., ICML 2025 (Iso-C)",
                "alpha mean(S) U V^T over the nonzero spectrum of sum_i D_i", "core", "merges.iso_c",
                {"alpha": _scale(1.0, (0.5, 1.0, 2.0, 4.0))}, exact="equal"),
    Method("iso_cts", "Marczak et al., ICML 2025 (Iso-CTS)",
                "alpha mean(S) U V^T over common (top fraction R of the sum) + task-specific directions", "core",
                "merges.iso_cts", {"common_fraction": Param(0.8, "share of the R-dim space for the common subspace", low=0.0,
                                                   high=1.0),
                          "alpha": _scale(1.0, (0.5, 1.0, 2.0, 4.0))},
                exact="equal"),
    Method("ctm", "He et al., ICML 2026 (Compress then Merge)",
                "U0 lambda disjoint_mean(trim(U0^T D_i U1)) U1^T, U0, U1: Tucker-2 of the norm-balanced D_i, rank k",
                "core", "merges.ctm",
                {"rank": Param(None, "rank k of the shared subspaces and of the merge (None: the largest task rank)",
                               low=1, kind=int, none_ok=True),
                 "beta": Param(0.25, "norm balancing for the subspaces (1: none; 0: every task at the mean norm)",
                               low=0.0, high=1.0),
                 "density": _density(0.25, "share of each task's k x k coordinates kept by TIES's trim (topK)"),
                 "lam": _scale(0.75, (0.5, 0.75, 1.0, 1.5))},
                "rank k (the largest task rank unless given)",
                exact="its code's algorithm (Tucker-2 by HOOI, TIES in the k x k coordinates) on the cores, which "
                      "are the dense updates in the stacked factors' singular bases", entrywise=True,
                default=False,   # not in the committed default run: --methods ctm_r8 (or ctm) asks for it
                identity={"density": 1.0, "lam": 1.0}),
    Method("cat", "Prabhakar et al., COLING 2025 industry (LoRA Soups, CAT)",
                "sum_i alpha_{i,l} s_i B_i A_i, one alpha per adapter per layer learned by gradient on validation rows",
                "data", "merge_fit.cat",
                {"rows": Param(32, "validation rows per task (after each adapter's training rows)", low=1, kind=int),
                 "epochs": Param(2, "passes over those rows", low=1, kind=int),
                 "lr": Param(1e-2, "AdamW learning rate of the alphas", low=0.0, open="low"),
                 "init": Param(None, "initial alpha (None: 1/n)", none_ok=True)},
                "exact, rank R"),
    Method("lorahub", "Huang et al., COLM 2024 (LoraHub)",
                "s (sum_i w_i B_i)(sum_i w_i A_i), w by gradient-free search (Nevergrad NGOpt) on validation-row loss + L1",
                "data", "merge_fit.lorahub",
                {"rows": Param(5, "validation rows per task (after each adapter's training rows)", low=1, kind=int),
                 "budget": Param(40, "loss evaluations of the optimiser", low=1, kind=int),
                 "l1": Param(0.05, "weight of the L1 penalty on w", low=0.0),
                 "bound": Param(1.5, "search box |w_i| <= bound", low=0.0, open="low")},
                "exact, rank r"),
    Method("regmean", "Jin et al., ICLR 2023 (RegMean), as an exact LoRA",
                "sum_i s_i B_i (A_i G_i' G'^-1), G_i: Gram of task i's layer inputs, off-diagonals scaled by alpha",
                "data", "merge_fit.regmean",
                REGMEAN_PARAMS,
                "exact, rank R (or its best rank-k LoRA in RegMean's objective)",
                exact="equal (dense RegMean); Grams on the first training rows, alpha on the rows after"),
    Method("regmean_pp", "Nguyen et al., TMLR 2026 (RegMean++), as an exact LoRA",
                "RegMean block by block, each block's Grams on the inputs the merged earlier blocks give it",
                "data", "merge_fit.regmean_pp",
                {k: REGMEAN_PARAMS[k] for k in ("rows", "alpha", "rank")},
                "exact, rank R (or its best rank-k LoRA in RegMean's objective, block by block)",
                exact="equal (dense RegMean on the merged model's inputs); one pass through the blocks per alpha",
                default=False),
]}
