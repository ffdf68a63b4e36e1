"""Identities, tokens and permissions: the pure rules, the OAuth tokens, the hot-path check and the store."""

from __future__ import annotations

import base64
import time

import pytest
import sqlalchemy as sa

from berth.access import oauth
from berth.access.permissions import Caller, Level, acl_view, allows, level_of, parse_acl
from berth.errors import InvalidParameterValue, ResourceAlreadyExists, ResourceDoesNotExist, Unauthenticated
from berth.gateway.auth import AccessState, TokenAuthority, hash_token
from berth.store import EndpointRecord, Store

ALICE = Caller("1", "alice@example.com")
ADMIN = Caller("9", "admin", admin=True)
KEY = b"k" * 32


def test_levels_are_ordered_and_admins_manage_everything():
    acl = {ALICE.id: Level.CAN_QUERY}
    assert allows(ALICE, acl, Level.CAN_VIEW)
    assert allows(ALICE, acl, Level.CAN_QUERY)
    assert not allows(ALICE, acl, Level.CAN_MANAGE)
    assert level_of(Caller("2", "bob"), acl) is None
    assert level_of(ADMIN, {}) is Level.CAN_MANAGE


def test_acl_entries_are_all_checked_before_any_is_used():
    names = {("user", "alice@example.com"): "1", ("service_principal", "app-1"): "5"}

    def resolve(kind: str, name: str) -> str | None:
        return names.get((kind, name))

    body = {"access_control_list": [{"user_name": "alice@example.com", "permission_level": "CAN_QUERY"},
                                    {"service_principal_name": "app-1", "permission_level": "CAN_MANAGE"}]}
    assert parse_acl(body, resolve) == {"1": Level.CAN_QUERY, "5": Level.CAN_MANAGE}
    bad = [
        {"group_name": "users", "permission_level": "CAN_QUERY"},  # groups are out of scope
        {"user_name": "nobody", "permission_level": "CAN_QUERY"},
        {"user_name": "alice@example.com", "permission_level": "CAN_OWN"},
        {"user_name": "alice@example.com", "service_principal_name": "app-1", "permission_level": "CAN_VIEW"},
    ]
    for entry in bad:
        with pytest.raises(InvalidParameterValue):
            parse_acl({"access_control_list": [body["access_control_list"][0], entry]}, resolve)


def test_acl_view_lists_direct_grants_then_inherited_admins():
    view = acl_view("abc", {"1": Level.CAN_VIEW}, {"1": ALICE, "9": ADMIN}, [ADMIN])
    assert view["object_id"] == "/serving-endpoints/abc"
    first, second = view["access_control_list"]
    assert first["user_name"] == ALICE.name
    assert first["all_permissions"][0]["permission_level"] == "CAN_VIEW"
    assert second["all_permissions"][0] == {"permission_level": "CAN_MANAGE", "inherited": True,
                                            "inherited_from_object": ["/serving-endpoints/"]}


def test_oauth_tokens_verify_until_they_expire_and_only_with_their_key():
    now = 1_000_000.0
    answer = oauth.issue(KEY, "5", "app-1", "all-apis", now=now, ttl_s=60)
    assert answer["token_type"] == "Bearer"
    assert answer["expires_in"] == 60
    token = answer["access_token"]
    assert token.startswith(oauth.OAUTH_PREFIX)
    assert oauth.verify(KEY, token, now=now + 59) == ("5", now + 60)
    assert oauth.verify(KEY, token, now=now + 60) is None
    assert oauth.verify(b"x" * 32, token, now=now) is None
    assert oauth.verify(KEY, token[:-2] + "AA", now=now) is None


def test_token_requests_take_basic_or_form_credentials_and_only_client_credentials():
    basic = "Basic " + base64.b64encode(b"app-1:s3cret").decode()
    request = oauth.parse_token_request(b"grant_type=client_credentials&scope=all-apis", basic)
    assert (request.client_id, request.client_secret, request.scope) == ("app-1", "s3cret", "all-apis")
    form = oauth.parse_token_request(b"grant_type=client_credentials&client_id=a&client_secret=b", None)
    assert (form.client_id, form.client_secret) == ("a", "b")
    for body, auth, error in [(b"grant_type=password", basic, "unsupported_grant_type"),
                              (b"grant_type=client_credentials", None, "invalid_client"),
                              (b"grant_type=client_credentials&scope=admin", basic, "invalid_scope")]:
        with pytest.raises(oauth.OAuthError) as info:
            oauth.parse_token_request(body, auth)
        assert info.value.error == error


def _state(tokens: dict[str, tuple[str, float | None]], *callers: Caller) -> AccessState:
    return AccessState(tokens, {c.id: c for c in callers}, {"ep": frozenset({ALICE.id})}, KEY)


def test_authority_checks_expiry_revocation_and_the_principal():
    pat, short = "berth_alice", "berth_short"
    authority = TokenAuthority(_state({hash_token(pat): (ALICE.id, None),
                                       hash_token(short): (ALICE.id, time.time() + 0.2)}, ALICE))
    header = f"Bearer {pat}".encode()
    assert authority.authenticate(header) == ALICE
    assert authority.authenticate(header) == ALICE  # cached
    assert authority.may_query(ALICE, "ep")
    assert not authority.may_query(ALICE, "other")
    assert authority.may_query(ADMIN, "other")
    assert authority.authenticate(f"Bearer {short}".encode()) == ALICE
    time.sleep(0.25)
    with pytest.raises(Unauthenticated, match="expired"):  # the cached answer expires with the token
        authority.authenticate(f"Bearer {short}".encode())
    authority.replace(_state({}, ALICE))  # revoked: the cache goes with the old state
    with pytest.raises(Unauthenticated):
        authority.authenticate(header)
    for bad in (None, b"Basic abc", b"Bearer ", b"Bearer nope"):
        with pytest.raises(Unauthenticated):
            authority.authenticate(bad)


def test_authority_accepts_oauth_tokens_of_live_principals_only():
    sp = Caller("5", "app-1", "service_principal")
    token = oauth.issue(KEY, sp.id, sp.name, "all-apis")["access_token"]
    authority = TokenAuthority(_state({}, sp))
    assert authority.authenticate(f"Bearer {token}".encode()) == sp
    authority.replace(_state({}))  # the service principal was deleted
    with pytest.raises(Unauthenticated, match="no longer exists"):
        authority.authenticate(f"Bearer {token}".encode())
    with pytest.raises(Unauthenticated):
        TokenAuthority(AccessState(principals={sp.id: sp})).authenticate(f"Bearer {token}".encode())  # no key


@pytest.fixture
def store(store_url):  # type: ignore[no-untyped-def]
    s = Store(store_url)  # SQLite and PostgreSQL (tests/conftest.py)
    yield s
    s.close()


def test_store_principals_are_unique_and_deleting_one_removes_its_tokens_and_grants(store):
    access = store.access
    alice = access.create_principal("user", "alice@example.com", "Alice")
    with pytest.raises(ResourceAlreadyExists):
        access.create_principal("user", "alice@example.com", "Alice again")
    access.add_token(alice.id, hash_token("berth_a"), comment="laptop", expires_at=None)
    store.create_endpoint(EndpointRecord("ep", "e1", {}), owner=alice.id)
    assert access.acl("e1") == {alice.id: Level.CAN_MANAGE}
    assert access.acls() == {"ep": {alice.id: Level.CAN_MANAGE}}
    access.delete_principal(alice.id, "user")
    assert access.token_hashes() == {}
    assert access.acl("e1") == {}
    with pytest.raises(ResourceDoesNotExist):
        access.delete_principal(alice.id, "user")


def test_store_grants_replace_or_merge_and_go_with_the_endpoint(store):
    access = store.access
    store.create_endpoint(EndpointRecord("ep", "e1", {}), owner="1")
    access.set_acl("e1", {"2": Level.CAN_QUERY}, replace=False)
    assert access.acl("e1") == {"1": Level.CAN_MANAGE, "2": Level.CAN_QUERY}
    access.set_acl("e1", {"2": Level.CAN_VIEW}, replace=True)
    assert access.acl("e1") == {"2": Level.CAN_VIEW}
    store.delete_endpoint("ep")
    assert access.acl("e1") == {}


def test_legacy_admin_tokens_become_the_admin_users_and_the_signing_key_is_stable(store):
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO tokens (token_hash, comment, is_admin, created_at) "
                             "VALUES (:h, 'admin', :admin, 1.0)"), {"h": hash_token("berth_old"), "admin": True})
    admin = store.access.ensure_admin()
    assert admin.admin
    assert store.access.ensure_admin().id == admin.id
    assert store.access.token_hashes() == {hash_token("berth_old"): (admin.id, None)}
    assert store.access.key("oauth") == store.access.key("oauth")
    assert len(store.access.key("oauth")) == 32


def test_access_service_scim_tokens_secrets_oauth_and_permissions(store):
    from berth.control.access import AccessService
    from berth.errors import PermissionDenied

    states: list[AccessState] = []
    service = AccessService(store, on_change=states.append)
    admin = store.access.ensure_admin().caller
    user = service.scim_create(admin, "Users", {"userName": "alice@example.com"})
    assert user["userName"] == "alice@example.com"
    assert user["schemas"] == ["urn:ietf:params:scim:schemas:core:2.0:User"]
    alice = Caller(user["id"], "alice@example.com")
    assert states[-1].principals[alice.id] == alice  # the hot path learns of her at once
    with pytest.raises(PermissionDenied):
        service.scim_create(alice, "Users", {"userName": "mallory"})
    with pytest.raises(InvalidParameterValue):
        service.scim_create(admin, "Users", {"userName": ""})
    assert service.scim_list(admin, "Users")["totalResults"] == 2

    sp = service.scim_create(admin, "ServicePrincipals", {"displayName": "ci-bot"})
    assert sp["applicationId"]
    assert sp["displayName"] == "ci-bot"
    secret = service.new_secret(admin, sp["id"])["secret"]
    basic = "Basic " + base64.b64encode(f"{sp['applicationId']}:{secret}".encode()).decode()
    granted = service.oauth_token(b"grant_type=client_credentials&scope=all-apis", basic)
    bot = TokenAuthority(service.state()).authenticate(f"Bearer {granted['access_token']}".encode())
    assert bot.id == sp["id"]
    assert bot.kind == "service_principal"
    wrong = "Basic " + base64.b64encode(f"{sp['applicationId']}:nope".encode()).decode()
    with pytest.raises(oauth.OAuthError) as info:
        service.oauth_token(b"grant_type=client_credentials", wrong)
    assert info.value.status == 401

    made = service.create_token(alice, {"comment": "laptop", "lifetime_seconds": 3600})
    info_ = made["token_info"]
    assert info_["comment"] == "laptop"
    assert info_["expiry_time"] > info_["creation_time"]
    authority = TokenAuthority(service.state())
    assert authority.authenticate(f"Bearer {made['token_value']}".encode()) == alice
    assert [t["token_id"] for t in service.list_tokens(alice)["token_infos"]] == [info_["token_id"]]
    with pytest.raises(InvalidParameterValue):
        service.create_token(alice, {"lifetime_seconds": -5})
    service.delete_token(alice, {"token_id": info_["token_id"]})
    authority.replace(states[-1])
    with pytest.raises(Unauthenticated):  # revoked: gone from the state the gateway swaps in
        authority.authenticate(f"Bearer {made['token_value']}".encode())

    store.create_endpoint(EndpointRecord("ep", "e1", {}), owner=admin.id)
    with pytest.raises(PermissionDenied):
        service.require(alice, "ep", Level.CAN_VIEW)
    with pytest.raises(ResourceDoesNotExist):
        service.require(alice, "missing", Level.CAN_VIEW)
    view = service.set_permissions(admin, "e1", {"access_control_list": [
        {"user_name": "alice@example.com", "permission_level": "CAN_QUERY"}]}, replace=False)
    assert {"user_name": "alice@example.com", "display_name": "alice@example.com",
            "all_permissions": [{"permission_level": "CAN_QUERY", "inherited": False}]} in view["access_control_list"]
    assert service.require(alice, "ep", Level.CAN_QUERY) is Level.CAN_QUERY
    assert states[-1].queriers["ep"] == frozenset({admin.id, alice.id})
    with pytest.raises(PermissionDenied):
        service.set_permissions(alice, "e1", {"access_control_list": []}, replace=True)
    with pytest.raises(InvalidParameterValue):  # a bad entry changes nothing
        service.set_permissions(admin, "e1", {"access_control_list": [{"group_name": "users",
                                                                        "permission_level": "CAN_VIEW"}]},
                                replace=True)
    assert service.require(alice, "ep", Level.CAN_QUERY) is Level.CAN_QUERY
    assert service.visible(alice)("ep")
    assert not service.visible(alice)("other")
    service.scim_delete(admin, "Users", alice.id)
    assert alice.id not in states[-1].principals
    assert store.access.acl("e1") == {admin.id: Level.CAN_MANAGE}
