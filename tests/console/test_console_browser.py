"""The web console in a real browser (Debian's chromium, headless, through Playwright) against a real
hub, with a real device (azure-iot-device over MQTT/TLS on 127.0.0.102:8883): sign in, create a device,
watch its telemetry arrive live, edit its twin and see the device receive the patch, invoke a direct
method, find a refused connection on the security page; a Data Reader gets no controls and the API
refuses them anyway; OIDC sign-in (authorization code + PKCE) with the test issuer. Screenshots of
each page go to tests/artifacts/console/ (git-ignored)."""

from __future__ import annotations

import base64
import json
import os
import queue
import re
from collections.abc import Iterator
from typing import Any

import pytest
from azure.iot.device import IoTHubDeviceClient, Message, MethodRequest, MethodResponse
from console_helpers import ARTIFACTS, PASSWORD, ConsoleHub

DEVICE = "console-dev"
WAIT_MS = 45_000


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(browser: Any, hub: ConsoleHub, username: str) -> Any:
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{hub.url}/console/")
    page.wait_for_selector("#signin-form")
    if username == "admin":
        shot(page, "signin")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("#signin-submit")
    page.wait_for_selector("#ov-connections")
    return page


@pytest.fixture(scope="module")
def admin(browser: Any, console_hub: ConsoleHub) -> Iterator[Any]:
    console_hub.add_operator("admin", "Owner")
    page = sign_in(browser, console_hub, "admin")
    try:
        yield page
    finally:
        page.context.close()


@pytest.fixture(scope="module")
def device_client(console_hub: ConsoleHub, admin: Any) -> Iterator[IoTHubDeviceClient]:
    """The device created through the console, connected with azure-iot-device over MQTT/TLS."""
    try:
        console_hub.device(DEVICE)
    except Exception:
        console_hub.call(console_hub.hub.registry.create(DEVICE, {"authentication": {"type": "sas"}},
                                                          actor="test"))
    assert console_hub.ca_file is not None
    client = IoTHubDeviceClient.create_from_connection_string(
        console_hub.connection_string(DEVICE), server_verification_cert=console_hub.ca_file.read_text(),
        connection_retry=False, keep_alive=30)
    client.connect()
    try:
        yield client
    finally:
        client.shutdown()


def test_sign_in_shows_the_overview(admin: Any) -> None:
    assert admin.locator("#who").inner_text().startswith("admin")
    admin.wait_for_selector("#lag tbody tr")
    shot(admin, "overview")
    csp = admin.evaluate("fetch('/console/').then(r => r.headers.get('content-security-policy'))")
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_create_a_device(admin: Any, console_hub: ConsoleHub) -> None:
    admin.goto(f"{console_hub.url}/console/#/devices")
    admin.fill("#new-device-id", DEVICE)
    admin.click("#create-submit")
    admin.wait_for_selector(f"tr[data-device='{DEVICE}']")
    assert console_hub.device(DEVICE).status.value == "enabled"
    admin.click(f"tr[data-device='{DEVICE}'] .show-keys")
    admin.wait_for_selector(f"tr[data-device='{DEVICE}'] .keys:has-text('primary')")
    shot(admin, "devices")


def test_live_telemetry_from_the_device_sdk(admin: Any, console_hub: ConsoleHub,
                                            device_client: IoTHubDeviceClient) -> None:
    admin.goto(f"{console_hub.url}/console/#/device/{DEVICE}")
    admin.wait_for_selector("#telemetry-state:has-text('live')")
    for i in range(60):  # the feed starts at "end": send until the page shows messages
        body = json.dumps({"temperature": 20 + i % 5, "humidity": 40 + i % 3})
        device_client.send_message(Message(body, content_encoding="utf-8", content_type="application/json"))
        if admin.locator(".telemetry-row").count() >= 3:
            break
        admin.wait_for_timeout(500)
    admin.wait_for_selector(".telemetry-row:has-text('temperature')")
    admin.wait_for_selector("#telemetry-legend:has-text('temperature')")
    assert admin.locator(".telemetry-row").count() >= 3
    shot(admin, "device")


def test_edit_the_twin_and_the_device_receives_the_patch(admin: Any, console_hub: ConsoleHub,
                                                         device_client: IoTHubDeviceClient) -> None:
    patches: queue.Queue[dict[str, Any]] = queue.Queue()
    device_client.on_twin_desired_properties_patch_received = patches.put
    admin.goto(f"{console_hub.url}/console/#/device/{DEVICE}")
    admin.wait_for_selector("#twin-patch")
    admin.fill("#twin-patch", json.dumps({"properties": {"desired": {"interval": 7}}}))
    admin.click("#twin-save")
    admin.wait_for_selector("#device-status:has-text('twin updated')")
    patch = patches.get(timeout=30)
    assert patch["interval"] == 7
    assert '"interval": 7' in admin.locator("#twin").inner_text()


def test_invoke_a_direct_method(admin: Any, console_hub: ConsoleHub,
                                device_client: IoTHubDeviceClient) -> None:
    seen: list[MethodRequest] = []

    def answer(request: MethodRequest) -> None:
        seen.append(request)
        device_client.send_method_response(MethodResponse.create_from_method_request(
            request, 200, {"rebooting": True, "delay": request.payload["delay"]}))

    device_client.on_method_request_received = answer
    admin.goto(f"{console_hub.url}/console/#/device/{DEVICE}")
    admin.fill("#method-name", "reboot")
    admin.fill("#method-payload", '{"delay": 3}')
    admin.click("#method-invoke")
    admin.wait_for_selector("#method-result:has-text('rebooting')")
    result = json.loads(admin.locator("#method-result").inner_text())
    assert result == {"status": 200, "payload": {"rebooting": True, "delay": 3}}
    assert seen and seen[0].name == "reboot"
    shot(admin, "device-method")


def test_send_a_cloud_to_device_message(admin: Any, console_hub: ConsoleHub,
                                        device_client: IoTHubDeviceClient) -> None:
    received: queue.Queue[Message] = queue.Queue()
    device_client.on_message_received = received.put
    admin.goto(f"{console_hub.url}/console/#/device/{DEVICE}")
    admin.fill("#c2d-body", "open the valve")
    admin.click("#c2d-send")
    admin.wait_for_selector("#device-status:has-text('queued')")
    message = received.get(timeout=30)
    assert message.data == b"open the valve"


def test_a_refused_connection_shows_on_the_security_page(admin: Any, console_hub: ConsoleHub,
                                                         device_client: IoTHubDeviceClient) -> None:
    assert console_hub.ca_file is not None
    wrong = base64.b64encode(os.urandom(32)).decode()
    intruder = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={console_hub.settings.hub.hostname};DeviceId={DEVICE};SharedAccessKey={wrong}",
        server_verification_cert=console_hub.ca_file.read_text(), connection_retry=False)
    with pytest.raises(Exception):  # noqa: B017 - the SDK's own error type for CONNACK 4
        intruder.connect()
    intruder.shutdown()
    admin.goto(f"{console_hub.url}/console/#/security")
    admin.wait_for_selector("#failures-legend")
    admin.fill("#f-action", "auth.mqtt")
    admin.select_option("#f-outcome", "refused")
    admin.click("#audit-filter button")
    row = admin.wait_for_selector(f"#audit tbody tr:has-text('device:{DEVICE}')")
    assert row is not None
    text = row.inner_text()
    assert "auth.mqtt" in text and "refused" in text and "bad-signature" in text
    admin.wait_for_selector("#failures-legend:has-text('bad-signature')")
    assert "version" in admin.locator("#trust-version").inner_text()
    shot(admin, "security")


def test_a_data_reader_sees_but_gets_no_controls_and_the_api_refuses(browser: Any,
                                                                     console_hub: ConsoleHub) -> None:
    console_hub.add_operator("reader", "DataReader")
    page = sign_in(browser, console_hub, "reader")
    try:
        page.goto(f"{console_hub.url}/console/#/devices")
        page.wait_for_selector(f"tr[data-device='{DEVICE}']")
        for control in ("#create-form", ".toggle-status", ".show-keys"):
            assert page.locator(control).count() == 0, control
        page.goto(f"{console_hub.url}/console/#/device/{DEVICE}")
        page.wait_for_selector("#twin")
        for control in ("#twin-form", "#c2d-form", "#method-form"):
            assert page.locator(control).count() == 0, control
        shot(page, "reader-device")
        statuses = page.evaluate("""async (device) => {
            const me = await (await fetch('/console/api/me')).json();
            const h = {'Content-Type': 'application/json', 'X-CSRF-Token': me.csrf};
            const q = '?api-version=2021-04-12';
            const calls = [
              fetch(`/twins/${device}${q}`, {method: 'PATCH', headers: h, body: '{"tags": {"x": 1}}'}),
              fetch(`/tether/devices/${device}/disable${q}`, {method: 'POST', headers: h, body: '{}'}),
              fetch(`/devices/${device}/messages/deviceBound${q}`, {method: 'POST', headers: h, body: 'x'}),
              fetch(`/twins/${device}/methods${q}`,
                    {method: 'POST', headers: h, body: '{"methodName": "m"}'}),
              fetch(`/devices/new-one${q}`, {method: 'PUT', headers: h, body: '{}'}),
            ];
            const keys = await (await fetch(`/devices/${device}${q}`)).json();
            return {writes: (await Promise.all(calls)).map(r => r.status),
                    key: keys.authentication.symmetricKey.primaryKey};
        }""", DEVICE)
        assert statuses == {"writes": [403] * 5, "key": None}
    finally:
        page.context.close()


def test_oidc_sign_in_with_authorization_code_and_pkce(browser: Any, console_hub: ConsoleHub) -> None:
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto(f"{console_hub.url}/console/")
        page.click("#provider-testidp")
        page.wait_for_selector("#ov-connections")
        assert re.match(r"carol · Owner", page.locator("#who").inner_text())
        cookies = {c["name"]: c for c in context.cookies()}
        session = cookies["__Host-tether-session"]
        assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
        assert "code=" not in page.url and "state=" not in page.url
    finally:
        context.close()
