"""The console's own routes without a browser: static files with strict headers and an allow-list,
OIDC sign-in (code + PKCE against the test issuer) and its refusals, the summaries' access rules."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from operator_helpers import PASSWORD, OperatorEnv


async def test_static_files_carry_a_strict_policy_and_nothing_else_is_served(env: OperatorEnv) -> None:
    r = await env.client.get("/console/")
    assert r.status_code == 200 and "<script type=\"module\" src=\"/console/app.js\">" in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert (await env.client.get("/console/app.js")).headers["content-type"].startswith("text/javascript")
    for bad in ("/console/..%2f..%2fhub.py", "/console/routes.py", "/console/__init__.py"):
        assert (await env.client.get(bad)).status_code == 404


async def test_oidc_sign_in_opens_a_session_with_the_claim_roles(env: OperatorEnv) -> None:
    env.issuer.login_subject, env.issuer.login_claims = "olga", {"roles": ["Tether.Reader"]}
    start = await env.client.get("/console/auth/oidc/testidp/start")
    assert start.status_code == 302
    to_idp = start.headers["location"]
    query = parse_qs(urlsplit(to_idp).query)
    assert query["code_challenge_method"] == ["S256"] and query["state"] and query["nonce"]
    login_cookie = start.cookies["tether-login"]
    back = await env.client.get(to_idp)  # the issuer signs olga in at once
    callback = back.headers["location"]
    done = await env.client.get(callback, cookies={"tether-login": login_cookie})
    assert done.status_code == 302 and done.headers["location"] == "/console/"
    session = done.cookies["tether-session"]
    me = (await env.client.get("/console/api/me", cookies={"tether-session": session})).json()
    assert me["user"] == "user:olga" and me["issuer"] == env.issuer.issuer
    assert me["roles"] == [{"role": "DataReader", "scope": None, "source": "claim"}]
    replay = await env.client.get(callback, cookies={"tether-login": login_cookie})
    assert replay.status_code == 401  # a code/state is used once
    assert (await env.last_refusal("auth.console")).reason == "bad-sign-in-state"


async def test_a_callback_from_another_browser_is_refused(env: OperatorEnv) -> None:
    start = await env.client.get("/console/auth/oidc/testidp/start")
    back = await env.client.get(start.headers["location"])
    r = await env.client.get(back.headers["location"], cookies={"tether-login": "someone-else"})
    assert r.status_code == 401
    assert "tether-session" not in r.cookies


async def test_summaries_follow_the_roles(env: OperatorEnv) -> None:
    await env.hub.operators.add("twin", PASSWORD, actor="test")
    await env.hub.roles.assign("local", "twin", "TwinContributor", actor="test")
    async with env.session_client(await env.login("twin")) as c:
        assert (await c.get("/console/api/overview")).status_code == 200
        assert (await c.get("/console/api/auth-failures")).status_code == 403
        assert (await c.get("/console/api/security-status")).status_code == 403
    await env.login("twin", "wrong password!!")
    await env.hub.operators.add("boss", PASSWORD, actor="test")
    await env.hub.roles.assign("local", "boss", "Owner", actor="test")
    async with env.session_client(await env.login("boss")) as c:
        failures = (await c.get("/console/api/auth-failures?hours=1")).json()
        assert sum(failures["reasons"]["bad-credentials"]) >= 1 and failures["buckets"] == 24
        overview = (await c.get("/console/api/overview")).json()
        assert overview["connections"] == 0 and len(overview["partitions"]) == 4
