"""The check of issue 13: every page in the navigation, walked in headless Chromium
as admin (staff), alice (manager of vision) and bob (member of vision), at
1440x900 and 390x844. A page fails the walk on:

* any console error or uncaught script error,
* any 5xx response (the page or anything it loads),
* any horizontal scroll of the page body (wide tables scroll in their own box),
* any same-site link on it that this role cannot open (a 403 or 404, or worse),
* a chart whose legend covers its x axis labels, or whose colour bar labels overlap,
* any Content-Security-Policy violation the browser reports (an inline script, style
  or handler, an eval), or a page whose policy allows 'unsafe-inline' or 'unsafe-eval'.

The walk starts from the top bar's links (both menus included) and follows the links
each page shows, one page of each kind (the path with numbers taken out), so a job
page, a model page, a host page and every form are walked too. Django's own admin,
the API, downloads and CSV exports are only checked as links, not walked.

Every walked page is saved as a screenshot under test-artifacts/walk/ (gitignored)
for a reviewer to look at."""
from __future__ import annotations

import re
import shutil
from urllib.parse import urlsplit

import pytest

from conftest import SHOTS, log_in
from live_support import clean_streams  # noqa: F401
from ui_support import build_console

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

VIEWPORTS = {"desktop": (1440, 900), "phone": (390, 844)}
MAX_PAGES = 40  # per walk; the console has about 25 kinds of page

# Linked but not walked: Django's admin (its own pages), the JSON API and its docs,
# downloads and exports. They are still opened once, to check the role may.
NOT_WALKED = re.compile(r"^/(admin/|api/|static/|favicon)|/artifacts/|[?&]format=csv")

# Every violation of the page's Content-Security-Policy, reported to the test as it happens.
REPORT_CSP = """document.addEventListener('securitypolicyviolation', e => window.ndCspViolation(
    e.effectiveDirective + ' refused ' + (e.blockedURI || 'inline') + ' at ' + (e.sourceFile || e.documentURI)
    + ':' + e.lineNumber + (e.sample ? ' (' + e.sample + ')' : '')));"""

PLOTS_DRAWN = """() => [...document.querySelectorAll('[data-figure], [data-live-chart]')]
    .every(el => el.classList.contains('js-plotly-plot'))"""


# Per chart: the legend against the x axis's tick labels and title, and the colour
# bar's labels against each other.
CHART_OVERLAPS = """() => {
    const box = el => el.getBoundingClientRect();
    const hit = (a, b) => !(a.right <= b.left || b.right <= a.left || a.bottom <= b.top || b.bottom <= a.top);
    const found = [];
    document.querySelectorAll('.js-plotly-plot').forEach(plot => {
        if (!plot.offsetParent) return;  // hidden
        const legend = plot.querySelector('.legend');
        const ticks = [...plot.querySelectorAll('.xtick text, .g-xtitle text')].filter(t => t.textContent.trim());
        if (legend && ticks.some(t => hit(box(t), box(legend.querySelector('.bg') || legend))))
            found.push((plot.id || 'chart') + ': legend on the x axis labels');
        const bar = [...plot.querySelectorAll('.colorbar text')].filter(t => t.textContent.trim());
        bar.forEach((a, i) => bar.slice(i + 1).forEach(b => {
            if (hit(box(a), box(b))) found.push((plot.id || 'chart') + ': colour bar labels ' + a.textContent
                                               + ' / ' + b.textContent);
        }));
    });
    return found;
}"""


def shape(target: str) -> str:
    """One walked page per kind: /jobs/12/ and /jobs/13/ are the same kind of page, and
    so are a team's page and another's, or a page with other query parameters."""
    path = re.sub(r"\d+", "N", urlsplit(target).path)
    return re.sub(r"^/teams/(?!new/)[\w-]+/", "/teams/S/", path)


@pytest.fixture
def console(cast, tiny_model, dataset, clean_streams):  # noqa: F811
    return build_console(cast, tiny_model, dataset)


class Walk:
    def __init__(self, browser, base: str, role: str, viewport: str):
        width, height = VIEWPORTS[viewport]
        self.base, self.role, self.viewport = base, role, viewport
        self.page = log_in(browser, base, role, width, height)
        self.problems: list[str] = []
        self.link_status: dict[str, int] = {}
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.problems.append(f"{self.where()}: script error: {exc}"))
        self.page.on("response", self._response)
        self.page.expose_function("ndCspViolation", lambda text: self.problems.append(f"{self.where()}: CSP: {text}"))
        self.page.add_init_script(REPORT_CSP)
        self.shots = SHOTS / "walk" / viewport / role
        shutil.rmtree(self.shots, ignore_errors=True)  # this run's pages only
        self.shots.mkdir(parents=True, exist_ok=True)

    def where(self) -> str:
        return f"{self.role} @ {self.viewport} {urlsplit(self.page.url).path}"

    def _console(self, message) -> None:
        if message.type == "error":
            self.problems.append(f"{self.where()}: console error: {message.text}")

    def _response(self, response) -> None:
        if response.status >= 500:
            self.problems.append(f"{self.where()}: {response.status} from {response.url}")
        if response.request.resource_type == "document" and urlsplit(response.url).netloc == urlsplit(self.base).netloc:
            policy = response.headers.get("content-security-policy", "")
            if "script-src 'self'" not in policy or "unsafe-inline" in policy or "unsafe-eval" in policy:
                self.problems.append(f"{self.where()}: {response.url} has the policy {policy!r}")

    def links(self) -> list[str]:
        """Same-site link targets on the page (path + query), in document order."""
        hrefs = self.page.eval_on_selector_all("a[href]", "els => els.map(a => a.href)")
        found = []
        for href in hrefs:
            parts = urlsplit(href)
            if f"{parts.scheme}://{parts.netloc}" != self.base or (
                    parts.path == urlsplit(self.page.url).path and not parts.query):
                continue
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            if target not in found:
                found.append(target)
        return found

    def check_link(self, target: str) -> None:
        if target not in self.link_status:
            response = self.page.request.get(self.base + target, max_redirects=5)
            self.link_status[target] = response.status
            if response.status >= 400:
                self.problems.append(f"{self.where()}: links to {target}, which answers {response.status} "
                                     f"for {self.role}")

    def visit(self, target: str, number: int) -> list[str]:
        response = self.page.goto(self.base + target)
        assert response is not None
        if response.status >= 400:
            self.problems.append(f"{self.where()}: {target} answered {response.status}")
        self.page.wait_for_load_state("load")
        self.page.wait_for_function(PLOTS_DRAWN)
        self.page.evaluate("document.fonts.ready")
        width = self.page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        if width[0] > width[1]:
            wide = self.page.evaluate("""() => [...document.querySelectorAll('body *')]
                .filter(el => el.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
                .filter(el => !el.closest('.table-scroll, .quota-scroll, .menu-items'))
                .slice(0, 5).map(el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '')
                    + (el.className && typeof el.className === 'string' ? '.' + el.className.split(' ').join('.') : ''))""")
            self.problems.append(f"{self.where()}: the page scrolls sideways ({width[0]} px wide in {width[1]}); "
                                 f"too wide: {wide}")
        crowded = self.page.evaluate(CHART_OVERLAPS)
        if crowded:
            self.problems.append(f"{self.where()}: chart text overlaps: {crowded}")
        name = re.sub(r"[^\w]+", "-", target.strip("/")) or "home"
        self.page.screenshot(path=str(self.shots / f"{number:02d}-{name}.png"), full_page=True)
        links = self.links()
        for link in links:
            self.check_link(link)
        return links

    def run(self, extra: list[str] = ()) -> list[str]:
        self.page.goto(self.base + "/")
        queue = [t for t in self.links() if self.page.locator(f"header a[href='{t}']").count()]
        assert queue, "no navigation links"
        # A job page in every state (pending, running, failed, ...): walked one by one,
        # as each shows different sections.
        walked: set[str] = set()
        for number, target in enumerate(extra, 1):
            walked.add(shape(target))
            queue.extend(self.visit(target, 50 + number))
        number = 0
        while queue and number < MAX_PAGES:
            target = queue.pop(0)
            if shape(target) in walked or NOT_WALKED.search(target):
                self.check_link(target)
                continue
            walked.add(shape(target))
            number += 1
            queue.extend(self.visit(target, number))
        self.walked = walked
        return self.problems


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
@pytest.mark.parametrize("role", ["admin", "alice", "bob"])
def test_every_page_in_the_navigation_is_clean_for_each_role_and_screen(console, live_server, browser, role,
                                                                        viewport):
    walk = Walk(browser, live_server.url, role, viewport)
    jobs = [job for name, job in console.jobs.items() if name != "audio" or role == "admin"]
    problems = walk.run(extra=[f"/jobs/{job.pk}/" for job in jobs])
    walk.page.context.close()
    assert not problems, "\n".join(problems)
    # The walk reached the pages the issue names, for every role.
    for kind in ("/teams/S/jobs/", "/jobs/N/", "/teams/S/jobs/new/inference/", "/teams/S/models/",
                 "/teams/S/datasets/", "/hosts/", "/hosts/trn-walk/", "/fleet/", "/teams/S/", "/teams/S/usage/",
                 "/tokens/"):
        assert kind in walk.walked, f"{role} @ {viewport} never reached {kind}: {sorted(walk.walked)}"
    if role != "admin":
        assert "/models/N/" in walk.walked  # admin's first team (audio) has no model
    else:
        assert {"/quotas/", "/usage/", "/teams/new/"} <= walk.walked
