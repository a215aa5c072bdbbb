"""The report's methodology: answers to NIST SP 800-226's questions for how fedtext trains
and accounts (the JSON and the HTML report both carry them)."""

from __future__ import annotations

from collections.abc import Sequence

from privacy.schemas import PRIVACY_UNIT, MethodologyItem


def _unit_answer(units: Sequence[str], run_units: dict[str, str] | None = None) -> str:
    example = (
        "One training example (one text with its label) of one tenant's dataset "
        f"(privacy unit '{PRIVACY_UNIT}'). A person who contributed k examples is "
        "protected only by group privacy, which degrades roughly as k times epsilon; "
        "the unit is not a person and not a whole tenant."
    )
    user = (
        "One user (privacy unit 'user'): every row that carries one value of the tenant's "
        "user column. Each user keeps at most k rows (max_examples_per_user in each entry's "
        "applied settings), is Poisson-sampled as a whole, and its rows' mean gradient is "
        "clipped as one contribution; the held-out evaluation counts are released at "
        "sensitivity k. The guarantee holds for a person only if the user column names "
        "people (docs/AUDIT.md)."
    )
    # Which run protected what (k included): the JSON and the HTML both carry this answer.
    per_run = ""
    if run_units and "user" in units:
        per_run = (
            " Runs and their unit: "
            + "; ".join(f"{run}: {label}" for run, label in run_units.items())
            + "."
        )
    if set(units) == {"user"}:
        return user + per_run
    if "user" in units:
        return (
            "Entries name their unit (column 'unit'): on 'example' entries, " + example
            + " On 'user' entries, " + user + " The composed total mixes both units: it is a "
            "per-user figure only where every entry is a 'user' entry." + per_run
        )  # fmt: skip
    return example


def methodology(
    delta: float, units: Sequence[str] = (), run_units: dict[str, str] | None = None
) -> list[MethodologyItem]:
    """Answers to the questions of NIST SP 800-226 for how fedtext trains and accounts.

    ``units``: the privacy units of the tenant's entries (none: example); ``run_units``:
    each run's unit label with its k (``unit_label``)."""
    qa = [
        ("What is the unit of privacy?", _unit_answer(units, run_units)),
        (
            "What is the neighbouring relation?",
            "Add-or-remove one example (unbounded DP), the relation under which Opacus "
            "analyses Poisson-subsampled DP-SGD and under which dp-accounting's PLD "
            "accountant is run (NeighboringRelation.ADD_OR_REMOVE_ONE).",
        ),
        (
            "Which variant of DP, with which epsilon and delta?",
            f"Approximate (epsilon, delta)-DP with delta fixed at {delta:g} for this tenant; "
            "every epsilon in this report is at that delta. A run is refused when delta is "
            "not below 1/n for the tenant's n training examples.",
        ),
        (
            "Which mechanism is accounted?",
            "DP-SGD (Opacus): Poisson sampling at rate q, per-example gradient clipping to "
            "norm C, Gaussian noise of standard deviation sigma*C per step. Each ledger "
            "entry is one federated round, or the tenant's personalization after the last "
            "round (a DP fine-tune of the global model on its own data, charged like a "
            "round but not a round): 'steps' such steps with the recorded sigma and q.",
        ),
        (
            "How are releases composed?",
            "Sequentially over every entry of the tenant, across runs and datasets, without "
            "assuming datasets are disjoint. The figure of record is Opacus's PRV "
            "accountant; RDP (Opacus) is shown as an upper-bound cross-check, and the total "
            "is recomputed independently with the PLD accountant of Google's dp-accounting. "
            "A dataset's own budget is checked against the composition of that dataset's "
            "entries only; the tenant budget against all of them.",
        ),
        (
            "When is a release charged?",
            "When a round is dispatched, before any message leaves the coordinator: a "
            "round that fails afterwards, or a reply that is rejected, stays charged "
            "(over-counting, never under-counting). A round that would pass the tenant's "
            "or the dataset's budget is not dispatched. Each check and its charge run in "
            "one transaction holding the tenant's ledger head, and a run reserves its "
            "planned releases before round 1: every decision counts other active runs' "
            "reservations as spent, so concurrent runs cannot overspend one budget.",
        ),
        (
            "What is protected?",
            "The model updates each client sends (DP-SGD is applied on the tenant's own "
            "machine, so the coordinator only ever sees noised updates) and everything "
            "computed from them: the global model and every stored model version, as "
            "post-processing. Evaluation metrics leave a node only as confusion counts "
            "with Gaussian noise (sensitivity 1 per matrix), charged as ledger entries of "
            "purpose 'evaluate' (sample rate 1, one step per matrix); accuracy and "
            "macro-F1 in run summaries and model versions are computed from those, each "
            "with its standard deviation and 95% interval under the known noise and the "
            "test split's size (privacy/uncertainty.py). A personalized model replaces "
            "the global one, and if-better deploys a version, only when the released "
            "difference is significant (one-sided, 5% error rate); otherwise the version "
            "records why not.",
        ),
        (
            "What is NOT covered by this guarantee?",
            "The number of training examples of each tenant, which its node states for "
            "planning (the sample rate q = 1/ceil(n/B) reveals it to within a batch "
            "anyway); which tenants took part and when; error codes of failed nodes (codes "
            "only, never text). No training metric leaves a node and the test count is "
            "released only as the noised total of the confusion counts. Hyperparameter "
            "search done outside the platform is not accounted. Client-level DP, when a "
            "run enables it, is accounted by Flower's own accountant and is not part of "
            "this ledger.",
        ),
        (
            "What trust is placed in whom?",
            "Each tenant's client node is trusted to run DP-SGD with the parameters it "
            "was sent; it reports the parameters it applied and a mismatch is rejected. "
            "The coordinator is trusted to write the ledger; the hash chains make an "
            "edit, deletion or reordering of entries detectable. Each report and ledger "
            "export comes with a head signed with Ed25519 under a key derived from the "
            "platform's key-encryption key (not in the database): against a head kept "
            "outside the database, a deleted tail, a tenant's chain deleted, a budget "
            "edited outside the record or a chain rewritten and re-hashed is detected "
            "(the command fedtext audit verify --head FILE). Keep the heads.",
        ),
        (
            "Implementation caveats?",
            "In secure mode Opacus would draw from torchcsprng, which has no build for "
            "current torch; fedtext then draws DP-SGD noise and Poisson sampling from "
            "torch generators seeded with 63 bits of OS entropy per release (not "
            "cryptographically secure generators), and noise as Opacus's secure mode "
            "does (four draws summed and halved, its defence against floating-point "
            "attacks). With secure mode off (tests) the generators are seeded the same "
            "way but noise is a single draw. Evaluation noise comes from the OS CSPRNG "
            "(random.SystemRandom), in floating point.",
        ),
        (
            "Is there an empirical check?",
            "The command fedtext audit canary trains a small federation with canary "
            "sentences in "
            "one tenant's data and derives a statistical lower bound on epsilon from a "
            "membership-inference test (one-run auditing, Steinke, Nasr and Jagielski "
            "2023). It can reveal a broken implementation; it cannot prove the upper "
            "bound, and on small federations the bound is far below the accounted epsilon.",
        ),
    ]
    return [MethodologyItem(question=q, answer=a) for q, a in qa]
