"""RunSpec: every setting of a training run, its default, bounds and choices, in one place.

The HTTP ``RunCreate``, the CLI's run options, the simulation's config and the ServerApp's
reading of ``context.run_config`` (kebab-case keys, as in pyproject's
``[tool.flwr.app.config]``) all derive from it; a test checks that pyproject equals it.
Adding a run option is one field here plus its use.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema

# Import-light (no torch, Flower or SQL): the CLI's help and the SDK's schemas read RunSpec.
from models.family_defaults import (
    DEFAULT_FAMILY,
    FAMILIES,
    TrainingDefaults,
    default_max_seq_len,
    families,
    training_defaults,
)
from privacy.evaluation import DEFAULT_EVAL_NOISE

if TYPE_CHECKING:
    from models.spec import ModelSpec

# A run config's word for "the model family's default" (models.training_defaults).
AUTO = "auto"
# Settings that only pick a simulated node's share of the demo corpus; a federation's
# nodes train on their own files.
SIMULATION_ONLY = ("tenants", "partitioning", "alpha", "max_train_examples", "max_test_examples")
CLIENT_DP = ("off", "fixed")
# Which of a run's new model versions serve at once (server/release.py decides).
DEPLOY_POLICIES = ("if-better", "first", "always", "never")
# The registries' names without their imports (Flower, numpy); tests/cli/test_startup.py
# checks them equal to server.strategy's and clients.data's.
STRATEGIES = ("fedadam", "fedavg", "fedprox")
PARTITIONERS = ("iid", "dirichlet", "topic")
# What one DP guarantee protects: one training example, or one person (every example that
# carries the same value in the tenant's user column, at most max-examples-per-user of them).
PRIVACY_UNITS = ("example", "user")


def _one_of(choices: tuple[str, ...], what: str) -> Any:
    """A choice, case and spaces ignored; an ``enum`` in the JSON schema (OpenAPI)."""

    def check(value: str) -> str:
        value = value.strip().lower()
        if value not in choices:
            raise ValueError(f"Unknown {what} {value!r}; known: {', '.join(choices)}.")
        return value

    return AfterValidator(check), WithJsonSchema({"type": "string", "enum": list(choices)})


def _dataset(name: str) -> str:
    from privacy.ledger import check_dataset  # SQL: imported when a run is validated

    return check_dataset(name)


def _not_the_runs(name: str) -> str:
    if name != "default":
        raise ValueError(
            "a run does not choose the dataset its charges land on: each tenant's node "
            "declares it (federation), or its admin sets it (PUT /v1/policy, or the "
            "operator's `fedtext policy set TENANT --dataset NAME`, simulation)"
        )
    return name


def _names(value: Any) -> Any:
    """A comma-separated string (run config) or a list: a tuple of stripped names."""
    if isinstance(value, str):
        return tuple(s.strip() for s in value.split(",") if s.strip())
    return value


def _json_object(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"model-config is not JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise ValueError("model-config is not a JSON object")
    return value


def _auto(value: Any) -> Any:
    """ "auto" or an empty value: left out (the family's default)."""
    return None if isinstance(value, str) and value.strip().lower() in (AUTO, "") else value


Names = Annotated[tuple[str, ...], BeforeValidator(_names)]
FAMILY_FIELDS = tuple(TrainingDefaults.__dataclass_fields__)
# The default of the family's settings: None until validation fills in the family's value.
FILLED: Any = None
_FAMILY_DEFAULT = "[default: the model family's, docs/TRAINING.md]"


class _FamilyDefaults(BaseModel):
    """What a request leaves out (None, "auto", empty) takes the family's default."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        family = str(data.get("model") or DEFAULT_FAMILY).strip().lower()
        family = family if family in families() else DEFAULT_FAMILY  # refused by its field
        given = {name: _auto(data.get(name)) for name in FAMILY_FIELDS}
        filled = training_defaults(family).fill(given)
        if _auto(data.get("max_seq_len")) in (None, 0, "0"):
            filled["max_seq_len"] = default_max_seq_len(family)
        data.update({k: v for k, v in filled.items() if k in cls.model_fields})
        return data


class RunSpec(_FamilyDefaults):
    """A training run's settings. Left-out family settings (None) take the family's
    defaults at validation, so a stored run shows what ran."""

    model_config = ConfigDict(frozen=True)  # with _FamilyDefaults': extra forbidden, by name

    run_id: str = Field(default="", max_length=64, description="Empty: a new id.")
    model: Annotated[str, *_one_of(FAMILIES, "model family")] = Field(
        default=DEFAULT_FAMILY,
        description="Model family: encoder-head (frozen public encoder + DP head), lstm, "
        "transformer or minilm.",
    )
    model_name: str = Field(
        default="", max_length=64, description="Name of the released model; empty: the family."
    )
    rounds: int = Field(
        default=FILLED, ge=1, le=100, description=f"Federated rounds {_FAMILY_DEFAULT}."
    )
    local_epochs: int = Field(
        default=FILLED, ge=1, le=20, description=f"Local epochs per round {_FAMILY_DEFAULT}."
    )
    batch_size: int = Field(
        default=FILLED,
        ge=0,
        le=4096,
        description=f"Expected (Poisson) batch; 0: sized by each tenant's data {_FAMILY_DEFAULT}.",
    )
    learning_rate: float = Field(
        default=FILLED, gt=0, le=100, description=f"Client learning rate {_FAMILY_DEFAULT}."
    )
    personalize_epochs: int = Field(
        default=FILLED, ge=0, le=20, description=f"DP fine-tune epochs; 0: off {_FAMILY_DEFAULT}."
    )
    epsilon: float = Field(
        default=3.0,
        gt=0,
        le=100,
        title="The target epsilon",
        description="Target epsilon per tenant for the run.",
    )
    clip_norm: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        title="The clipping norm",
        description="Per-example clipping norm.",
    )
    max_seq_len: int = Field(
        default=FILLED, ge=0, le=4096, description="Tokens per input; 0: the family's."
    )
    privacy_unit: Annotated[str, *_one_of(PRIVACY_UNITS, "privacy unit")] = Field(
        default="example",
        description="What epsilon protects: one training example, or one user (all rows with "
        "the same user-column value; needs that column in every tenant's data).",
    )
    user_column: str = Field(
        default="user",
        min_length=1,
        max_length=64,
        description="The data column naming who wrote each row (privacy-unit user).",
    )
    max_examples_per_user: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="k: a user's rows beyond k are left out of training (privacy-unit user).",
    )
    min_nodes: int = Field(default=2, ge=1, le=1000, description="Valid replies a round needs.")
    secure_mode: bool = Field(default=True, description="Opacus secure mode (off: tests only).")
    round_timeout: float = Field(
        default=3600.0, gt=0, le=7 * 86400, description="Seconds a round waits for replies."
    )
    labels: Names = Field(
        default=("negative", "neutral", "positive"), description="Class labels, in order."
    )
    strategy: Annotated[str, *_one_of(STRATEGIES, "strategy")] = Field(
        default="fedavg", description="Aggregation: fedavg, fedprox or fedadam."
    )
    proximal_mu: float = Field(default=0.01, ge=0, le=1000, description="FedProx mu.")
    server_learning_rate: float = Field(
        default=0.1, gt=0, le=100, description="FedAdam server learning rate."
    )
    fraction_train: float = Field(default=1.0, gt=0, le=1, description="Share of tenants/round.")
    # Standard deviation of the Gaussian noise on each count of the released evaluation
    # confusion matrices (sensitivity 1); 0 releases no evaluation metrics at all.
    eval_noise: float = Field(
        default=DEFAULT_EVAL_NOISE,
        ge=0,
        lt=1e6,
        description="Noise on released evaluation counts; 0: no evaluation released.",
    )
    client_dp: Annotated[str, *_one_of(CLIENT_DP, "client-dp")] = Field(
        default="off", description="off, or fixed: Flower's server-side fixed clipping."
    )
    client_dp_noise: float = Field(default=0.1, ge=0, le=1000, description="Client-level noise.")
    client_dp_clip: float = Field(default=10.0, ge=0, le=1e6, description="Client update clip.")
    resume: bool = Field(default=False, description="Continue the run from its checkpoint.")
    seed: int = Field(default=7, ge=0, le=2**31 - 1, description="Seed of sampling and init.")
    family_config: Annotated[dict[str, int | float | str | bool], BeforeValidator(_json_object)] = (
        Field(
            default_factory=dict,
            alias="model_config",
            max_length=32,
            description="The family's own settings (JSON object).",
        )
    )
    # Kept only so runs stored before issue 24 still parse: a run no longer chooses the
    # dataset its charges land on (each tenant's own declaration does), so any other value
    # is refused.
    dataset: Annotated[str, AfterValidator(_dataset), AfterValidator(_not_the_runs)] = Field(
        default="default",
        description="Not the run's to choose: each tenant's charges land on the dataset its "
        "node declares (federation) or its admin sets (PUT /v1/policy, simulation); only "
        "'default' is accepted, for stored runs.",
    )
    # Tenants that may train in this run; empty: every tenant whose node connects. Nodes of
    # other tenants are refused.
    participants: Names = Field(default=(), description="Tenants that may train; empty: any.")
    # LP-FT: a completed encoder-head run (MiniLM, the same labels) whose final global DP
    # head starts this minilm run's head.
    init_head_run: str = Field(default="", max_length=64, description="LP-FT source run.")
    # Off by default: a kept head keeps its KEK version in use; it is dropped when any of the
    # run's tenants is deleted.
    keep_head: bool = Field(default=False, description="Keep the final global head (LP-FT).")
    deploy: Annotated[str, *_one_of(DEPLOY_POLICIES, "deploy policy")] = Field(
        default="if-better",
        description="Which new versions serve at once: if-better (the tenant's first "
        "version, or one whose held-out macro-F1 beats the serving one's), first (only a "
        "tenant's first version), always or never; the others await an admin's deploy.",
    )
    # Simulation only (SIMULATION_ONLY): how simulated nodes share the demo corpus.
    tenants: Names = Field(
        default=("acme", "globex", "initech"), description="Simulated tenants, one node each."
    )
    partitioning: Annotated[str, *_one_of(PARTITIONERS, "partitioning")] = Field(
        default="iid", description="How simulated tenants split the corpus."
    )
    alpha: float = Field(default=0.5, gt=0, le=1000, description="Dirichlet concentration.")
    max_train_examples: int = Field(
        default=2000, ge=0, le=1_000_000, description="Training cap per tenant; 0: none."
    )
    max_test_examples: int = Field(
        default=500, ge=0, le=1_000_000, description="Test cap per tenant; 0: none."
    )

    @model_validator(mode="after")
    def _complete(self) -> RunSpec:
        """The rules that span settings."""
        if not self.run_id:
            object.__setattr__(self, "run_id", uuid.uuid4().hex)
        if not self.model_name:
            object.__setattr__(self, "model_name", self.model)
        if len(self.labels) < 2:
            raise ValueError("labels should list at least two classes.")
        if 0 < self.eval_noise < 0.5:
            raise ValueError("eval-noise should be 0 (no released evaluation) or at least 0.5.")
        self.spec()  # an invalid model configuration fails here, before any node is asked
        if self.init_head_run and not (
            self.model == "minilm" and self.spec().family_config().normalize
        ):
            raise ValueError(
                "init-head-run starts a minilm model from an encoder-head run's head: use "
                'model minilm with model-config {"normalize": true}.'
            )
        for what, names in (("participants", self.participants), ("tenants", self.tenants)):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} should name each tenant once.")
        if self.privacy_unit == "user" and self.model != "encoder-head":
            raise ValueError(
                "privacy-unit user is implemented for the encoder-head family only (user-level "
                f"clipping of its head); model {self.model} trains with privacy-unit example."
            )
        if self.client_dp == "fixed" and not (self.client_dp_noise > 0 and self.client_dp_clip > 0):
            raise ValueError("client-dp-noise and client-dp-clip should be positive values.")
        if self.participants and len(self.participants) < self.min_nodes:
            raise ValueError(
                f"{len(self.participants)} participant(s) cannot meet min-nodes {self.min_nodes}."
            )
        return self

    @classmethod
    def from_run_config(cls, *layers: Mapping[str, Any]) -> Self:
        """A RunSpec from kebab-case run-config layers (later wins; None values skipped).

        ValueError with one line per problem, naming the kebab-case key."""
        merged: dict[str, Any] = {}
        for layer in layers:
            merged.update({k: v for k, v in layer.items() if v is not None})
        return cls.parse({k.replace("-", "_"): v for k, v in merged.items()})

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> Self:
        """Validate snake_case ``values``; ValueError (not pydantic's) for the user."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise ValueError(f"Invalid run configuration: {describe(exc)}") from None

    def spec(self) -> ModelSpec:
        from models.spec import ModelSpec  # torch: imported when a run is validated

        return ModelSpec.create(
            self.model, list(self.labels), max_seq_len=self.max_seq_len, **self.family_config
        )

    def public(self) -> dict[str, Any]:
        """Every setting as JSON-ready data (snake_case; ``model_config`` for the family's)."""
        return self.model_dump(mode="json", by_alias=True)

    def run_config(self) -> dict[str, Any]:
        """The settings as ``flwr run --run-config`` / ``context.run_config`` values."""
        return {key(name): _config_value(v) for name, v in self.model_dump().items()}

    def server_part(self) -> dict[str, Any]:
        """The ServerApp's run config: RunSpec's settings less the simulation-only ones (and
        less what a subclass adds for its own machine)."""
        keep = {key(n) for n in RunSpec.model_fields if n not in SIMULATION_ONLY}
        return {k: v for k, v in self.run_config().items() if k in keep}


def request_model(name: str, settings: tuple[str, ...], doc: str, **extra: Any) -> type[BaseModel]:
    """A request schema made of some RunSpec settings (their defaults, bounds and choices)
    plus ``extra`` fields, with the same family-default filling."""
    fields: dict[str, Any] = {
        n: (RunSpec.model_fields[n].annotation, RunSpec.model_fields[n]) for n in settings
    }
    model = create_model(  # type: ignore[call-overload]
        name,
        __base__=_FamilyDefaults,
        __doc__=doc,
        **fields,
        **extra,
    )
    return model  # type: ignore[no-any-return]


def key(name: str) -> str:
    """The run-config (kebab-case) key of a RunSpec field."""
    return "model-config" if name == "family_config" else name.replace("_", "-")


def _config_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def describe(exc: ValidationError) -> str:
    """Pydantic's errors as one line per setting, in the run config's own words."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"] if p != "__root__"]
        name = key(loc[0]) if loc else ""
        field = RunSpec.model_fields.get(loc[0]) if loc else None
        what = (field.title if field is not None and field.title else None) or name
        parts.append(f"{name}: {_message(error, what)}" if name else _message(error, what))
    return "; ".join(parts) + "."


def _message(error: Any, what: str) -> str:
    bound = (error.get("ctx") or {}).values()
    limit = next(iter(bound), None)
    kind = error["type"]
    if kind == "extra_forbidden":
        return "not a run setting"
    if kind == "greater_than" and limit == 0:
        return f"{what} should be a positive value"
    if kind == "greater_than_equal" and limit == 1:
        return f"{what} should be a positive integer"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {"greater_than": "above", "greater_than_equal": "at least",
                 "less_than": "below", "less_than_equal": "at most"}  # fmt: skip
        return f"{what} should be {words[kind]} {limit}"
    return str(error["msg"]).removeprefix("Value error, ").rstrip(".")


def defaults() -> dict[str, Any]:
    """Every setting's default in run-config form ("auto" where the family decides)."""
    out = {}
    for name, field in RunSpec.model_fields.items():
        value = field.get_default(call_default_factory=True)
        out[key(name)] = AUTO if value is None else _config_value(value)
    return out
