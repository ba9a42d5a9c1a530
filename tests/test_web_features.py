"""The web client's settings, devices and history panels in a real browser (headless Chromium) against
`serve --ws-port --web-port --history-days 1`: read receipts turned off and on (the other side sees no `read`
while off; a new tab shows the stored setting; the other tab follows), a tab removing another of its user's
devices (the removed tab says so), and a conversation's past shown in a new tab and after the storage is
cleared, page by page, each message once; a new tab listing the 1:1 conversations its user had on other
devices, and the devices panel saying what the default device's status is. (A server without history:
tests/test_web_chat.py.)
"""

from __future__ import annotations

import json
import os
import socket

import pytest

from backend import protocol as p
from browser import Tab
from conftest import WebServer, add_users, eventually, raw_client

USERS = ("alice", "bob", "carol")
NAMES = {name: [f"{u}{i}" for u in USERS]
         for i, name in enumerate(("settings", "devices", "history", "convs", "late", "earlier"))}


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('webf')}/im.db"
    add_users(url, *(u for names in NAMES.values() for u in names))
    srv = WebServer(url, extra=["--history-days", "1"]).start()
    assert srv.wait_log("backend.worker: subscribed", 10), "".join(srv.lines)
    yield srv
    srv.kill()


def pw(uid: str) -> str:
    return f"{uid}-pw"


def shows(text: str) -> str:
    return f"[...document.querySelectorAll('#messages li')].some(li => li.textContent.includes({json.dumps(text)}))"


def marker(tab: Tab, peer: str) -> int:
    """The read marker as the server has it (a `read` request with seq 0 asks without moving it)."""
    return tab.js("return im.request({op: 'read', with: arguments[0], seq: 0}).then(a => a.seq);", peer)


def test_read_receipts_off_and_on(web, tabs, paho):
    alice, bob, _ = NAMES["settings"]
    b = paho(bob, device="desk")
    got_read: list[int] = []  # every `read` receipt bob's client gets, in order (the client keeps only the newest)
    peer_read = b._peer_read
    b._peer_read = lambda obj, catch_up=False: (got_read.append(obj.get("seq")), peer_read(obj, catch_up))[1]
    a = tabs(web.url).login(alice, pw(alice))
    a.el("#settings-button").click()
    assert a.wait("document.getElementById('read-receipts').checked === true", what="on by default")
    a.el("#read-receipts").click()
    a.wait("document.getElementById('settings-state').textContent === 'Read receipts off.'")
    assert a.js("return im.store.settings.read_receipts") is False
    a.el("#settings-close").click()

    seq1 = b.send(alice, "first, read while off").wait(5)["seq"]
    a.open(f"u:{bob}")  # in front: alice reads it, her marker moves
    a.wait(shows("first, read while off"))
    a.wait(f"im.store.convs['u:{bob}'].read === {seq1}", what="marked read")
    for _ in range(50):  # the server's marker (a request each: the answer is the event waited for)
        if marker(a, bob) == seq1:
            break
    assert marker(a, bob) == seq1

    a2 = tabs(web.url).login(alice, pw(alice))  # a new device: nothing saved, it shows what the server says
    a2.el("#settings-button").click()
    a2.wait("window.im.store.settings && document.getElementById('read-receipts').checked === false",
            what="the stored setting: off")
    a2.el("#read-receipts").click()  # on again, from the second tab: the first one follows
    a2.wait("document.getElementById('settings-state').textContent === 'Read receipts on.'")
    a.wait("im.store.settings.read_receipts === true", what="the other tab told")

    seq2 = b.send(alice, "second, read while on").wait(5)["seq"]
    a.on()  # in front (a.wait above brought it): it reads the new one
    a.wait(shows("second, read while on"))
    assert b.wait_for(lambda: b.peer_read.get(alice) == seq2, 10), (got_read, b.peer_read)
    # receipts reach bob in order: had the first read sent one, it would be here before the second's
    assert got_read == [seq2], got_read
    a.driver.refresh()  # a reload shows the setting at once (saved), then as the server has it
    a.wait("window.im && im.state === 'online'")
    a.el("#settings-button").click()
    assert a.wait("document.getElementById('read-receipts').checked === true")


def test_remove_another_device(web, tabs):
    alice, *_ = NAMES["devices"]
    t1 = tabs(web.url).login(alice, pw(alice))
    t2 = tabs(web.url).login(alice, pw(alice))
    d1, d2 = t1.js("return im.device"), t2.js("return im.device")
    t1.el("#devices-button").click()
    row = "document.querySelector('#devices-list li[data-device=\"%s\"]')"
    t1.wait(f"{row % d2} && {row % d2}.textContent.includes('online')", what="the other tab listed, online")
    assert t1.js(f"return {row % d1}.textContent").startswith(f"{d1} (this tab): online")
    assert t1.js(f"return {row % d1}.querySelector('button')") is None  # this tab cannot remove itself
    t1.js(f"{row % d2}.querySelector('button.remove-device').click()")
    alert = t1.driver.switch_to.alert
    assert d2 in alert.text
    alert.accept()
    t1.wait(f"document.querySelectorAll('#devices-list li').length && !{row % d2}", what="the list without it")
    assert t1.js("return document.getElementById('devices-error').textContent") == ""
    t1.el("#devices-close").click()

    t2.on()  # back in front: the tab contacts the server, hears it was removed, says so
    t2.wait("!document.getElementById('notice').hidden", what="the removed tab's notice")
    assert "removed" in t2.js("return document.getElementById('notice-text').textContent")
    assert t2.js("return im.removed && im.state === 'online'")


def test_history_in_a_new_tab_and_page_by_page(web, tabs, paho):
    alice, bob, carol = NAMES["history"]
    b = paho(bob, device="desk")
    phone = paho(alice, device="phone")  # alice's other device: it acks, so nothing waits for a new one
    c = paho(carol, device="desk")
    for i in range(45):  # one at a time: two senders, the seq order is the order sent
        assert b.send(alice, f"b{i}").wait(5)["status"] == "stored"
        if i % 5 == 4:
            assert phone.send(bob, f"a{i // 5}").wait(5)["status"] == "stored"
    c.create_group("hist", [alice], name="History")
    for i in range(3):
        assert c.send_group("hist", f"g{i}").wait(5)["status"] == "stored"
    assert phone.wait_for(lambda: len(phone.messages) >= 45 + 4, 15)  # bob's, the group's event and messages
    phone.flush_acks()

    t = tabs(web.url).login(alice, pw(alice))
    b.send(alice, "live").wait(5)  # pushed to the tab: held before the history comes
    t.open(f"u:{bob}")
    t.wait("document.querySelectorAll('#messages li').length === 50 && !document.getElementById('load-earlier').hidden",
           what="the newest page of 50 and the control")
    expected = []
    for i in range(45):
        expected.append(f"b{i}")
        if i % 5 == 4:
            expected.append(f"a{i // 5}")
    expected.append("live")
    texts = [m["text"] for m in t.shown()]
    assert texts == expected[-50:], texts  # "live" once: held, and in the history page too
    mine = t.js("return [...document.querySelectorAll('#messages li.mine .body')].map(e => e.textContent)")
    assert mine == [x for x in expected[-50:] if x.startswith("a")], mine  # sent from the phone: alice's own
    t.el("#load-earlier").click()
    t.wait(f"document.querySelectorAll('#messages li').length === {len(expected)}", what="the page before")
    t.wait("document.getElementById('load-earlier').hidden", what="no more: the control goes")
    assert [m["text"] for m in t.shown()] == expected
    assert len({m["seq"] for m in t.shown()}) == len(expected)  # each seq once

    t.open("g:hist")  # a group: from the join, the event first
    t.wait("document.querySelectorAll('#messages li').length === 4", what="the group's past")
    assert [m["text"] for m in t.shown()][1:] == ["g0", "g1", "g2"]
    assert "created" in t.shown()[0]["text"]
    assert t.js("return document.getElementById('load-earlier').hidden")

    t.open(f"u:{bob}")
    t.js("localStorage.clear();")  # storage cleared: the same tab shows the recent past again
    t.driver.refresh()
    t.wait("window.im && im.state === 'online' && document.querySelectorAll('#messages li').length === 50",
           what="the newest page after the storage was cleared")
    assert [m["text"] for m in t.shown()] == expected[-50:]
    assert t.js("return im.errors.length") == 0


def test_a_new_tab_lists_the_recent_conversations_and_labels_the_default_device(web, tabs, paho):
    alice, bob, carol = NAMES["convs"]
    v1 = paho(alice)  # alice's v1 client: the default device ""
    b = paho(bob, device="desk")
    assert b.send(alice, "from bob").wait(5)["status"] == "stored"
    assert v1.wait_for_messages(1, 15)
    v1.flush_acks()
    assert v1.send(carol, "to carol").wait(5)["status"] == "stored"  # waits for carol: never alice's to pull

    t = tabs(web.url).login(alice, pw(alice))
    listed = "[...document.querySelectorAll('#conversations button')].map(b => b.dataset.key)"
    t.wait(f"{listed}.includes('u:{carol}') && {listed}.includes('u:{bob}')", what="both 1:1 conversations listed")
    assert t.js(f"return {listed}")[:2] == [f"u:{carol}", f"u:{bob}"], "the most recent first"
    t.open(f"u:{carol}")  # opening it loads its history, as before
    t.wait(shows("to carol"), what="the conversation's past")

    t.el("#devices-button").click()
    row = "document.querySelector('#devices-list li[data-device=\"\"]')"
    t.wait(f"{row} && {row}.textContent.includes('online')", what="the default device listed")
    assert "default device (v1 clients; follows the user's status)" in t.js(f"return {row}.textContent")
    t.el("#devices-close").click()
    assert t.js("return im.errors.length") == 0


def test_a_late_will_is_answered_with_online(web, tabs):
    """A broker cluster can deliver an earlier connection's will after the tab's `online` (docs/PROTOCOL.md,
    section 3, "A late will"): the tab hears the live `offline` on its own status and says `online` again, so
    the worker does not count it offline while it waits for pushes. The retained word at login is not answered."""
    alice = NAMES["late"][0]
    a = tabs(web.url).login(alice, pw(alice))
    topic = p.status_topic(alice, a.js("return im.device"))
    watcher, rc, seen = raw_client(web.port, alice, pw(alice), f"{alice}:watch-{os.urandom(3).hex()}")
    old, rc2, _ = raw_client(web.port, alice, pw(alice), f"{alice}:old-{os.urandom(3).hex()}", will=(topic, "offline"))
    try:
        assert rc is not None and not rc.is_failure and rc2 is not None and not rc2.is_failure
        watcher.subscribe(topic, 1)
        words = lambda: [m.payload.decode() for m in seen if m.topic == topic]  # noqa: E731
        assert eventually(lambda: words() == ["online"], 10), words()  # the retained word: the tab is online
        assert a.js("return im.statusRestated || 0") == 0
        old._sock.shutdown(socket.SHUT_RDWR)  # the earlier connection vanishes: its will says `offline`
        old.loop_stop()
        assert eventually(lambda: words() == ["online", "offline", "online"], 10), words()
        assert a.js("return im.statusRestated") == 1
    finally:
        for c in (watcher, old):
            c.disconnect()
            c.loop_stop()


def test_load_earlier_goes_past_pages_the_tab_holds(web, tabs, paho):
    """A tab that was online while 100 messages came holds two pages of them: "Load earlier messages" fetches
    the pages it holds (nothing new) and goes on to the one before them, so a click shows something (a trial
    clicked and saw nothing change, the control still there)."""
    alice, bob, _ = NAMES["earlier"]
    b = paho(bob, device="desk")
    phone = paho(alice, device="phone")  # alice's other device acks: nothing waits for a new one
    for i in range(60):
        assert b.send(alice, f"old{i}").wait(5)["status"] == "stored"
    assert phone.wait_for(lambda: len(phone.messages) >= 60, 15)
    phone.flush_acks()
    t = tabs(web.url).login(alice, pw(alice))
    for i in range(100):
        assert b.send(alice, f"live{i}").wait(5)["status"] == "stored"
    t.wait(f"(im.store.convs['u:{bob}']?.messages.length || 0) === 100", what="the 100 pushed to the tab")
    t.open(f"u:{bob}")
    t.wait("document.querySelectorAll('#messages li').length === 100 && !document.getElementById('load-earlier').hidden",
           what="what it holds, and the control")
    t.el("#load-earlier").click()  # the page before the newest is held too: it goes on to the one before that
    t.wait("document.querySelectorAll('#messages li').length === 150", what="one click: 50 older ones")
    texts = [m["text"] for m in t.shown()]
    assert texts == [f"old{i}" for i in range(10, 60)] + [f"live{i}" for i in range(100)], texts[:3]
