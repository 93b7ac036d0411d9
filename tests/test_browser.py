"""The example chat site driven in headless Chromium: two pages, each served by a different server
process, talk to each other through the room, and the worker answers a shout.

Needs the Debian ``chromium`` package at /usr/bin/chromium and the ``playwright`` Python package;
Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import os

import pytest

from .test_example_site import run_chat_site

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
TIMEOUT_MS = 15_000

if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"{CHROMIUM} is missing (install the Debian package chromium)", allow_module_level=True
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright Python package is not installed"
)


@pytest.fixture
def site(prefix, tmp_path):
    with run_chat_site(prefix, tmp_path) as running:
        yield running


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_room(browser, server, room):
    # A context per page, so the two behave as two separate visitors.
    page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{server.http_url}/?room={room}")
    sync_api.expect(page.locator("#status")).to_have_attribute("data-state", "open")
    sync_api.expect(page.locator("#status")).to_have_text(f"connected to process {server.proc.pid}")
    return page


def test_two_browsers_on_two_servers_chat(site, browser):
    expect = sync_api.expect
    daphne, uvicorn = site.servers
    ann = open_room(browser, daphne, "lobby")
    bob = open_room(browser, uvicorn, "lobby")
    assert ann.url == f"{daphne.http_url}/chat/lobby/"
    expect(bob.locator("#room-name")).to_have_text("lobby")

    ann.fill("#author-input", "ann")
    ann.fill("#message-input", "hello <b>bob</b>")
    ann.click("#send-button")
    # Markup typed by a user is shown as text, never interpreted.
    expect(bob.locator("#messages li.message.chat")).to_have_text(["ann:hello <b>bob</b>"])
    expect(ann.locator("#messages li.message.chat")).to_have_text(["ann:hello <b>bob</b>"])
    expect(ann.locator("#message-input")).to_have_value("")

    bob.fill("#message-input", "quiet please")
    bob.click("#shout-button")
    expect(bob.locator("#messages li.message.shout")).to_have_text(
        [f"worker {site.worker.pid} (#1):QUIET PLEASE"]
    )

    # Enter sends too. Ann's list then holds both messages and not bob's private shout reply,
    # which would have arrived before this message had it been sent to her.
    bob.fill("#message-input", "bye")
    bob.press("#message-input", "Enter")
    expect(ann.locator("#messages li.message")).to_have_text(
        ["ann:hello <b>bob</b>", "anonymous:bye"]
    )
