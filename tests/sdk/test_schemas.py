"""The SDK's schemas are import-light copies where they must be: they agree with the sources."""

from __future__ import annotations

from privacy import report, schemas
from serving import schemas as api
from tenancy import tables, tenants


def test_tenant_fields_equal_the_tables() -> None:
    light, table = api.TenantBase.model_fields, tables.TenantBase.model_fields
    assert set(light) == set(table)
    for name, field in table.items():
        assert light[name].default == field.default, name
        assert light[name].annotation == field.annotation, name
    assert api.TenantBase.model_json_schema()["properties"]["name"]["maxLength"] == 63
    assert api.MAX_BUDGET_DELTA == tenants.MAX_BUDGET_DELTA


def test_the_report_and_head_shapes_are_one_each() -> None:
    assert report.AuditReport is schemas.AuditReport is api.AuditReport
    assert issubclass(api.PrivacyReportPublic, schemas.AuditReport)
