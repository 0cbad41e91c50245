"""The endpoint page in headless Chromium: the playground streams an answer token by
token through the endpoint's stable URL (the real gateway, jobs.gateway, in a thread
of this process, in front of a real cpu replica of the tiny model), signed in with
the browser's session; the page fits a phone (390 px)."""
from __future__ import annotations

import copy

import pytest
from django.utils import timezone

from conftest import SHOTS, log_in
from jobs.endpoints import routing
from jobs.models import Endpoint, EndpointRevision, Job, Kind, Replica
from tests.gateway_support import ThreadServer
from tests.polling import wait_until
from tests.serve_support import replica as real_replica

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(300)]
MAX_TOKENS = 200


@pytest.fixture
def gateway(settings, live_server):
    """The gateway on a free port, trusting the live server's origin; the page points at it."""
    from jobs.gateway.app import Gateway
    from jobs.live.store import redis

    redis().flushdb()
    settings.CSRF_TRUSTED_ORIGINS = [*settings.CSRF_TRUSTED_ORIGINS, live_server.url]
    with ThreadServer(Gateway(), lifespan="on") as server:
        # The console's host name on the gateway's port: the browser sends the session
        # cookie to a host, whatever the port (as a deployment must arrange it).
        server.url = server.url.replace("127.0.0.1", "localhost")
        settings.ENDPOINT_GATEWAY_URL = server.url
        policy = copy.deepcopy(settings.CONTENT_SECURITY_POLICY)
        policy["DIRECTIVES"]["connect-src"].append(server.url)
        settings.CONTENT_SECURITY_POLICY = policy
        yield server


@pytest.fixture
def serving(cast, tiny_model, tiny_model_dir, cpu_host, tmp_path):
    """Endpoint vision/chat with one ready replica: a real cpu server of the tiny model
    (started directly here; test_endpoints_e2e runs replicas through the worker)."""
    with real_replica(tiny_model_dir, tmp_path / "replica", max_batch_size=4) as server:
        endpoint = Endpoint.objects.create(team=cast.vision, name="chat", model=tiny_model, family="cpu",
                                           options={"max_batch_size": 4, "max_seq_len": 256, "max_concurrent": 8},
                                           serving_revision=1, created_by=cast.bob)
        EndpointRevision.objects.create(endpoint=endpoint, number=1, model=tiny_model, options=endpoint.options,
                                        state="live")
        job = Job.objects.create(team=cast.vision, user=cast.bob, kind=Kind.SERVE, family="cpu", status="running",
                                 host=cpu_host, core_start=0, max_runtime_s=0, started_at=timezone.now())
        Replica.objects.create(endpoint=endpoint, job=job, revision=1, state="ready", url=server.url,
                               ready_at=timezone.now())
        routing.publish(endpoint.pk)
        yield endpoint


def test_the_playground_streams_the_answer_token_by_token_through_the_stable_url(
        cast, serving, gateway, live_server, browser):
    page = log_in(browser, live_server.url, "bob")
    page.goto(f"{live_server.url}/endpoints/{serving.pk}/")
    assert gateway.url in page.text_content("#endpoint-url")
    # Each token's arrival time, as the page appends it.
    page.evaluate("""() => { window.tokenTimes = [];
        new MutationObserver(ms => ms.forEach(m => m.addedNodes.forEach(() => window.tokenTimes.push(performance.now()))))
          .observe(document.getElementById('playground-output'), {childList: true}); }""")
    page.fill("#playground-max-tokens", str(MAX_TOKENS))
    page.click("#playground-send")
    status = wait_until(lambda: page.text_content("#playground-status"), 120, "the answer to finish",
                        until=lambda text: "first after" in text or "HTTP" in text or "did not answer" in text)
    times = page.evaluate("window.tokenTimes")
    shown = int(status.split(" tokens")[0])
    assert 3 <= shown <= MAX_TOKENS and len(times) == shown, status  # one span per streamed token
    # They arrived over time, not in one piece (a long answer: on a loaded machine a short
    # one can be generated whole before the page reads its first chunk).
    assert len(set(times)) >= 3, times
    assert page.text_content("#playground-output").strip()
    page.screenshot(path=str(SHOTS / "endpoint-playground.png"), full_page=True)


def _fits(page, what: str) -> None:
    """Nothing wider than the phone, with every form opened: no sideways scrolling, and
    each field, button and table cell of the page inside the screen or in a box that scrolls."""
    page.evaluate("() => document.querySelectorAll('details').forEach(d => { d.open = true; })")
    overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    # what sticks out of the screen outside any box that scrolls or clips it
    wide = page.evaluate("""() => [...document.querySelectorAll('body *')].filter(e => {
        if (e.getBoundingClientRect().right <= window.innerWidth + 1) return false;
        for (let p = e.parentElement; p && p !== document.body; p = p.parentElement) {
          if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(p).overflowX)) return false;
        }
        return true;
      }).slice(0, 6).map(e => `${e.tagName}#${e.id}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`)""")
    assert overflow <= 0, f"{what} is {overflow}px wider than the phone: {wide}"
    outside = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => e.offsetParent !== null && e.getBoundingClientRect().right > window.innerWidth + 1)
        .map(e => e.name || e.id || e.textContent.trim())""")
    assert outside == [], f"{what}: {outside} reach past the screen's edge"


def test_the_endpoint_pages_fit_a_phone(cast, serving, gateway, live_server, browser):
    page = log_in(browser, live_server.url, "bob", width=390, height=844)
    for url in (f"/endpoints/{serving.pk}/", "/teams/vision/endpoints/"):
        page.goto(live_server.url + url)
        _fits(page, url)
    # A form sent with bad values comes back with its errors, still on the phone's screen.
    page.goto(f"{live_server.url}/teams/vision/endpoints/")
    page.evaluate("() => document.querySelectorAll('details').forEach(d => { d.open = true; })")
    page.fill("#new-endpoint input[name=name]", "no spaces allowed " * 4)
    page.fill("#new-endpoint input[name=max_replicas]", "0")
    page.click("#new-endpoint button[type=submit]")
    assert page.is_visible("#new-endpoint .errorlist")
    _fits(page, "the refused create form")
    page.goto(f"{live_server.url}/endpoints/{serving.pk}/")
    assert page.is_visible("#playground-send") and page.is_visible("#replicas")
    page.screenshot(path=str(SHOTS / "endpoint-phone.png"), full_page=True)


def test_a_long_endpoint_name_wraps_instead_of_widening_the_phone_page(cast, tiny_model, cpu_host, live_server,
                                                                      browser):
    """A name may be 63 characters of digits (one unbreakable word): the heading was
    461 px wide at 390."""
    options = {"max_batch_size": 4, "max_seq_len": 256, "max_concurrent": 8}
    endpoint = Endpoint.objects.create(team=cast.vision, name="9" * 63, model=tiny_model, family="cpu",
                                       options=options, created_by=cast.bob)
    EndpointRevision.objects.create(endpoint=endpoint, number=1, model=tiny_model, options=options, state="live")
    page = log_in(browser, live_server.url, "bob", width=390, height=844)
    for url in (f"/endpoints/{endpoint.pk}/", "/teams/vision/endpoints/"):
        page.goto(live_server.url + url)
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{url} is {overflow}px wider than the phone"
