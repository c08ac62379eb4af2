"""The operator↔pod Plan contract: Secret references, keys left out by the operator and filled in by the pod."""

from __future__ import annotations

import json

import pytest

from layerlb import plan, plan_contract
from tests.dataplane.helpers_runtime import l4_plan


def _with_certificates(*certificates: plan.Certificate) -> plan.Plan:
    base = l4_plan("192.0.2.1", [("https", 443, "TCP")], [9000], name="shop", generation=3)
    listener = base.listeners[0].model_copy(update={"certificates": certificates})
    return base.model_copy(update={"listeners": (listener,)})


def test_a_secret_reference_names_its_secret_and_other_sources_name_none() -> None:
    source = plan_contract.secret_source("shop-tls.v2")
    assert source == "Secret/shop-tls.v2"
    assert plan_contract.secret_name(source) == "shop-tls.v2"
    assert plan_contract.secret_name("file") is None
    assert plan_contract.secret_name("secret/shop-tls") is None  # the prefix is case-sensitive


@pytest.mark.parametrize(
    "source", ["Secret/", "Secret/a/b", "Secret/Shop", "Secret/-x", "Secret/" + "a" * 254]
)
def test_a_malformed_secret_reference_is_refused_saying_what_is_valid(source: str) -> None:
    with pytest.raises(ValueError, match=r"expected Secret/NAME, NAME a Secret name") as refused:
        plan_contract.secret_name(source)
    assert repr(source) in str(refused.value)


def test_keys_left_out_by_the_operator_are_filled_back_by_the_pod() -> None:
    from_secret = plan.Certificate(source="Secret/shop-tls", cert_pem="CHAIN", key_pem="KEY", names=("a",))
    inline = plan.Certificate(source="file", cert_pem="CHAIN2", key_pem="KEY2")
    resolved = _with_certificates(from_secret, inline)

    stored, secrets = plan_contract.without_keys(resolved)
    assert secrets == ["shop-tls"]
    assert [c.key_pem for c in stored.listeners[0].certificates] == ["", "KEY2"]
    assert '"KEY"' not in stored.model_dump_json()

    # What travels is JSON: the pod parses it back into a Plan first, then fills the keys in.
    received = plan.Plan.model_validate_json(stored.model_dump_json())
    assert plan_contract.secrets_named(received) == {"shop-tls"}
    assert plan_contract.with_keys(received, {"shop-tls": ("CHAIN", "KEY")}) == resolved


def test_the_pod_takes_the_chain_with_the_key_so_a_renewed_secret_serves_both() -> None:
    stored, _ = plan_contract.without_keys(
        _with_certificates(plan.Certificate(source="Secret/shop-tls", cert_pem="OLD", key_pem="OLD KEY"))
    )
    filled = plan_contract.with_keys(stored, {"shop-tls": ("NEW", "NEW KEY")}).listeners[0].certificates[0]
    assert (filled.cert_pem, filled.key_pem) == ("NEW", "NEW KEY")


def test_filling_names_every_secret_not_read_yet() -> None:
    stored, _ = plan_contract.without_keys(
        _with_certificates(
            plan.Certificate(source="Secret/b-tls", cert_pem="B", key_pem="KB"),
            plan.Certificate(source="Secret/a-tls", cert_pem="A", key_pem="KA"),
        )
    )
    with pytest.raises(plan_contract.MissingSecret) as missing:
        plan_contract.with_keys(stored, {})
    assert missing.value.names == ["a-tls", "b-tls"]


def test_a_plan_with_its_keys_or_without_certificates_is_left_as_it_is() -> None:
    served = _with_certificates(plan.Certificate(source="Secret/shop-tls", cert_pem="C", key_pem="K"))
    assert plan_contract.secrets_named(served) == set()  # standalone: the key is in the Plan
    assert plan_contract.with_keys(served, {}) == served
    bare = l4_plan("192.0.2.1", [("tcp", 80, "TCP")], [9000])
    assert plan_contract.without_keys(bare) == (bare, [])


def test_a_stored_plan_naming_a_malformed_secret_is_refused() -> None:
    stored = _with_certificates(plan.Certificate(source="Secret/a/b", cert_pem="C", key_pem=""))
    with pytest.raises(ValueError, match="'Secret/a/b': expected Secret/NAME"):
        plan_contract.secrets_named(stored)


def test_the_removed_plan_is_no_plan() -> None:
    assert json.loads(plan_contract.REMOVED_PLAN) == []
