"""The end of a run: the final phase (personalization and the released evaluation), each
tenant's model stored encrypted under its data key, the summary, the signed ledger heads."""

from __future__ import annotations

import json
import logging
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from sqlmodel import Session, select

from models import ModelSpec, build_model, load_model_state, save_weights
from privacy.accounting import compose_epsilon
from privacy.heads import platform_signer, sign_and_store
from privacy.ledger import PrivacyEvent, tenant_events
from privacy.params import DPParams
from privacy.uncertainty import (
    CONFIDENCE,
    DECISION_ERROR_RATE,
    compare,
    wide_interval_warning,
)
from runs.spec import RunSpec
from server.charging import make_charge
from server.planning import TenantPlan
from server.replies import Released
from server.rounds import torch_state
from server.strategy import PrivateStrategy
from tenancy.db import session_scope
from tenancy.governance import effective_deploy
from tenancy.platform import Platform
from tenancy.registry import deployed_version, store_model_version
from tenancy.tables import ModelVersion, Tenant

log = logging.getLogger("fedtext.server")


def final_phase(
    grid: Grid,
    cfg: RunSpec,
    platform: Platform,
    private: PrivateStrategy,
    spec: ModelSpec,
    arrays: ArrayRecord,
) -> tuple[dict[str, bytes], dict[str, Released]]:
    """Personalization and the released evaluation, charged together at round R + 1.

    Returns each personalized tenant's weights and each tenant's released evaluation.
    Both releases are charged before dispatch like any other (see
    ``PrivateStrategy.configure_final``).
    """
    phase_round = cfg.rounds + 1

    def releases(p: TenantPlan) -> list[tuple[str, DPParams]]:
        out: list[tuple[str, DPParams]] = []
        if cfg.personalize_epochs and p.personal_params:
            out.append(("personalize", p.personal_params))
        if p.eval_params:
            out.append(("evaluate", p.eval_params))
        return out

    messages = private.configure_final(
        phase_round,
        arrays,
        grid,
        charge=make_charge(platform, cfg.run_id, spec, releases),
        personalize_epochs=cfg.personalize_epochs,
    )
    replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
    done = private.aggregate_final(phase_round, replies)
    personal = {}
    for tenant, state in done.personal.items():
        model = build_model(spec)
        load_model_state(model, torch_state(state))
        personal[tenant] = save_weights(model)
    return personal, done.released


def release_models(
    platform: Platform,
    cfg: RunSpec,
    spec: ModelSpec,
    plans: dict[int, TenantPlan],
    global_weights: bytes,
    personal: dict[str, bytes],
    released: dict[str, Released],
    *,
    refused: list[str],
    private: PrivateStrategy,
) -> dict[str, Any]:
    """Encrypt each tenant's final model (personalized if it has one) under its data key.

    The metrics in the summary and on the model version are the DP-released ones
    (noised confusion counts, charged to the ledger); ``None`` where nothing was
    released. Exact metrics never reach the coordinator.
    """
    tenants: dict[str, Any] = {}
    with session_scope(platform.engine) as session:
        for plan in plans.values():
            tenant = session.get(Tenant, plan.tenant_id)
            if tenant is None or tenant.deleted_at is not None:
                continue
            charged = [
                e.params() for e in tenant_events(session, tenant.id) if e.run_id == cfg.run_id
            ]
            got = released.get(tenant.name, {})
            metrics, choice = released_metrics(
                got.get("global"), got.get("personal"), trained_personal=tenant.name in personal
            )
            own = personal.get(tenant.name) if choice["chosen"] == "personalized" else None
            metrics.update(
                train_examples=plan.num_train,
                metrics_release=metrics_release(plan),
                uncertainty_warning=wide_interval_warning(
                    metrics, eval_noise=cfg.eval_noise, examples=metrics["test_examples"]
                ),
                model_choice=choice,
            )
            serving = deployed_version(session=session, tenant_id=tenant.id, name=cfg.model_name)
            stored = session.exec(
                select(ModelVersion.id).where(
                    ModelVersion.tenant_id == tenant.id, ModelVersion.name == cfg.model_name
                )
            ).first()
            # Each tenant's own policy decides (the stricter of its policy now, at planning,
            # and the run's request): a partner's run cannot deploy over its version.
            policy = effective_deploy(session, tenant.id, plan.deploy, cfg.deploy)
            deploy, decision = deploy_decision(
                policy, serving, metrics, earlier_versions=stored is not None
            )
            row = store_model_version(
                session=session,
                keyring=platform.keyring,
                store=platform.store,
                tenant=tenant,
                name=cfg.model_name,
                spec_json=spec.to_json(),
                weights=own if own else global_weights,
                run_id=cfg.run_id,
                metrics={**metrics, "personalized": own is not None, "deploy": decision},
                deploy=deploy,
            )
            tenants[tenant.name] = {
                **metrics,
                "personalized": own is not None,
                "releases_charged": len(charged),
                "run_epsilon": compose_epsilon(charged, plan.round_params.delta),
                # Runs compose to less than their sum: what two runs like this one cost.
                "two_runs_epsilon": compose_epsilon(charged * 2, plan.round_params.delta),
                "noise_multiplier": plan.round_params.noise_multiplier,
                "sample_rate": plan.round_params.sample_rate,
                "steps_per_round": plan.round_params.steps,
                "delta": plan.round_params.delta,
                "model": cfg.model_name,
                "version": row.version,
                "deployed": row.deployed,
                "deploy": decision,
            }
    summary: dict[str, Any] = {
        "tenants": tenants,
        "refused": refused,
        "rejected": private.rejected,
        "failed": private.failed,
        "strategy": cfg.strategy,
        "target_epsilon": cfg.epsilon,
        "eval_noise": cfg.eval_noise,
        "confidence": CONFIDENCE,
        "decision_error_rate": DECISION_ERROR_RATE,
        "metrics_release": (
            f"evaluation metrics are DP-released: Gaussian noise of standard deviation "
            f"{cfg.eval_noise:g} on every confusion count, charged to the ledger as purpose "
            "'evaluate'; no training metric leaves a node"
            if cfg.eval_noise
            else "no evaluation metric is released (eval-noise 0); no training metric leaves a node"
        ),
    }
    if cfg.client_dp == "fixed":
        # Client-level DP (unit: one tenant's whole update): a Gaussian mechanism per round
        # without sampling amplification, composed over the rounds.
        delta = min(p.round_params.delta for p in plans.values())
        summary["client_level_dp"] = {
            "noise_multiplier": cfg.client_dp_noise,
            "clip_norm": cfg.client_dp_clip,
            "delta": delta,
            "epsilon": compose_epsilon([(cfg.client_dp_noise, 1.0, cfg.rounds)], delta),
        }
    return summary


# The figures of one released evaluation, each with its uncertainty (privacy.uncertainty).
FIGURES = ("accuracy", "macro_f1")
SUFFIXES = ("", "_sd", "_noise_sd", "_low", "_high")


def released_metrics(
    glob: dict[str, float] | None,
    pers: dict[str, float] | None,
    *,
    trained_personal: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics recorded on a tenant's new version and in the run summary, and which
    model (global or personalized) the version holds, with why.

    ``accuracy``, ``macro_f1`` and their ``_sd``, ``_noise_sd``, ``_low``, ``_high`` are the
    figures of the model stored (the one metric shown on Runs, Models and in the CLI);
    ``global_*`` and ``personalized_*`` keep both released evaluations. The personalized
    model is kept only when its released macro-F1 is significantly above the global
    model's on the same test split (one-sided, at ``DECISION_ERROR_RATE``, under the
    known noise of both releases); otherwise the global model is, and the choice says why.
    """
    metrics: dict[str, Any] = {}
    for prefix, fig in (("global", glob), ("personalized", pers)):
        for name in FIGURES:
            for sfx in SUFFIXES:
                metrics[f"{prefix}_{name}{sfx}"] = fig.get(name + sfx) if fig else None
    choice: dict[str, Any] = {"chosen": "global", "error_rate": DECISION_ERROR_RATE}
    if not trained_personal:
        choice["reason"] = "no personalized model was trained"
    elif (
        glob is None
        or pers is None
        or glob.get("macro_f1_noise_sd") is None
        or pers.get("macro_f1_noise_sd") is None
    ):
        choice["reason"] = (
            "no released evaluation to compare the personalized model with the global "
            "one (eval-noise 0): the global model is kept"
        )
    else:
        # Same test split, independent noise on each matrix: the noise is what differs.
        cmp = compare(
            pers["macro_f1"], pers["macro_f1_noise_sd"], glob["macro_f1"], glob["macro_f1_noise_sd"]
        )
        choice.update(
            chosen="personalized" if cmp.better else "global",
            difference=cmp.difference,
            difference_sd=cmp.sd,
            z=cmp.z,
            reason=f"personalized vs global on the same test split: {cmp.describe()}",
        )
    fig = pers if choice["chosen"] == "personalized" else glob
    for name in FIGURES:
        for sfx in SUFFIXES:
            metrics[name + sfx] = fig.get(name + sfx) if fig else None
    # The released (noised) total of the held-out split, not an exact count.
    metrics["test_examples"] = round(glob["examples"]) if glob else None
    for sfx in ("_sd", "_low", "_high"):
        metrics[f"test_examples{sfx}"] = glob.get(f"examples{sfx}") if glob else None
    metrics["confidence"] = CONFIDENCE if glob and "accuracy_low" in glob else None
    return metrics, choice


def deploy_decision(
    policy: str,
    serving: ModelVersion | None,
    metrics: dict[str, Any],
    *,
    earlier_versions: bool = False,
) -> tuple[bool, dict[str, Any]]:
    """Whether a tenant's new version serves at once under the run's ``deploy`` policy, and
    why (recorded on the version).

    ``if-better`` deploys only when the new version's released held-out macro-F1 is
    significantly above the serving version's: a one-sided z-test on the difference with
    both SDs (noise and sampling: the two versions may have been tested on different
    splits), at ``DECISION_ERROR_RATE``. Between two versions of equal exact score it
    deploys at most that often. Without both figures and their SDs (a version released
    before uncertainty was recorded) the new version waits for an admin, as under ``first``.

    No serving version while ``earlier_versions`` exist (none deployed, or the deployed
    row's signature does not verify: a flag cleared around the platform) is not "first":
    only ``always`` deploys then; otherwise an admin decides, so a database writer cannot
    open a tenant's model to a partner's run by clearing its deployed flag.
    """
    if serving is None:
        if policy in ("never", "always"):
            deploy, why = policy == "always", f"policy {policy}"
        elif earlier_versions:
            deploy, why = False, "earlier versions exist but none is served; an admin deploys it"
        else:
            deploy, why = True, "first version"
        return deploy, {"policy": policy, "deployed": deploy, "reason": why}
    if policy in ("always", "never", "first"):
        reason = {"always": "policy always", "never": "policy never", "first": "not the first"}
        return policy == "always", {
            "policy": policy, "deployed": policy == "always", "reason": reason[policy],
        }  # fmt: skip
    previous = json.loads(serving.metrics_json or "{}")
    new, old = metrics.get("macro_f1"), previous.get("macro_f1")
    new_sd, old_sd = metrics.get("macro_f1_sd"), previous.get("macro_f1_sd")
    if new is None or old is None:
        return False, {
            "policy": policy,
            "deployed": False,
            "reason": "no released held-out macro-F1 to compare; an admin deploys it",
            "compared_with": serving.version,
        }
    if new_sd is None or old_sd is None:
        return False, {
            "policy": policy,
            "deployed": False,
            "reason": f"held-out macro-F1 {new:.3f} vs {old:.3f} of v{serving.version}, "
            "but no uncertainty is recorded for both: the difference may be noise; an "
            "admin deploys it",
            "metric": "macro_f1",
            "compared_with": serving.version,
        }
    cmp = compare(new, new_sd, old, old_sd)
    return cmp.better, {
        "policy": policy,
        "deployed": cmp.better,
        "reason": f"held-out macro-F1 {new:.3f} vs {old:.3f} of v{serving.version}: "
        + cmp.describe()
        + ("" if cmp.better else f"; v{serving.version} keeps serving"),
        "metric": "macro_f1",
        "compared_with": serving.version,
        "difference": cmp.difference,
        "difference_sd": cmp.sd,
        "z": cmp.z,
        "error_rate": cmp.error_rate,
    }


def metrics_release(plan: TenantPlan) -> dict[str, Any] | None:
    """How this tenant's metrics were released: the Gaussian release's parameters."""
    if plan.eval_params is None:
        return None
    return {
        # clip_norm is the sensitivity: 1 example, or k rows of one user (privacy-unit user).
        "mechanism": f"gaussian on confusion counts (sensitivity {plan.eval_params.clip_norm:g})",
        "noise_sd": plan.eval_params.noise_multiplier * plan.eval_params.clip_norm,
        "matrices": plan.eval_params.steps,
        "delta": plan.eval_params.delta,
    }


def participant_ids(platform: Platform, run_id: str) -> list[str]:
    """Every tenant the run charged, from the ledger (a failed run has no outcome)."""
    with Session(platform.engine) as session:
        return sorted(
            {
                e.tenant_id
                for e in session.exec(select(PrivacyEvent).where(PrivacyEvent.run_id == run_id))
            }
        )


def sign_heads(platform: Platform, tenant_ids: list[str]) -> None:
    """Keep a signed head of every tenant the run charged, as the run ends."""
    try:
        signer = platform_signer(platform.keyring)
        with session_scope(platform.engine) as session:
            for tenant_id in tenant_ids:
                tenant = session.get(Tenant, tenant_id)
                if tenant is not None:
                    sign_and_store(
                        session,
                        signer,
                        tenant_id=tenant.id,
                        budget_epsilon=tenant.budget_epsilon,
                        budget_delta=tenant.budget_delta,
                    )
    except Exception:  # a missing key must not turn a finished run into a failed one
        log.exception("could not sign the ledger heads of the run's tenants")
