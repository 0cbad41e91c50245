"""What issue 13 asked of the pages, checked in headless Chromium (Playwright against
pytest-django's live_server, no worker: state changes are made in the test through
jobs.states, live samples through the agent's own Agent.handle).

Each test synchronizes on what the page shows (expect polling, wait_for_function),
never on a fixed sleep. Screenshots go to test-artifacts/console/."""
from __future__ import annotations

import json
import re

import pytest
from django.utils import timezone

from conftest import SHOTS, log_in
from jobs.lifecycle import states
from jobs.lifecycle.forms import MAX_HOSTS
from jobs.live import metrics
from jobs.models import AuditEntry, CoreAllocation, FamilyQuota, Host, Job, Membership, Team
from live_support import clean_streams, neuron_host, running_job  # noqa: F401
from ui_support import build_console, publish

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
S = Job.Status
PHONE = (390, 844)
DESKTOP = (1440, 900)
OUT = SHOTS / "console"


def shot(page, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)


@pytest.fixture
def console(cast, tiny_model, dataset, clean_streams):  # noqa: F811
    return build_console(cast, tiny_model, dataset)


def boxes_overlap(a: dict, b: dict) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])


def no_sideways_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


# --- bug 5: the quota page fits 1440 px ----------------------------------------------------

def test_the_quota_pages_save_buttons_are_in_view_at_1440(console, live_server, browser):
    page = log_in(browser, live_server.url, "admin", *DESKTOP)
    page.goto(f"{live_server.url}/quotas/")
    saves = page.locator(".quota-row button:has-text('Save')")
    assert saves.count() == 2
    for i in range(saves.count()):
        box = saves.nth(i).bounding_box()
        assert box["x"] + box["width"] <= DESKTOP[0], "a Save button is off-screen"
    assert no_sideways_scroll(page)
    shot(page, "quotas-1440")


# --- bug 7: phones ------------------------------------------------------------------------

def test_the_phone_navigation_is_one_compact_bar_that_opens_a_menu(console, live_server, browser):
    from playwright.sync_api import expect

    page = log_in(browser, live_server.url, "bob", *PHONE)
    header = page.locator("#topbar")
    assert header.bounding_box()["height"] < 64  # one bar, not a tall stack of links
    models = page.locator("#mainnav a:has-text('Models')")
    expect(models).to_be_hidden()
    page.click(".nav-toggle")
    expect(models).to_be_visible()
    assert page.get_attribute(".nav-toggle", "aria-expanded") == "true"
    shot(page, "phone-menu-open")
    models.click()
    page.wait_for_url(re.compile(r"/teams/vision/models/$"))
    expect(page.locator("#mainnav a:has-text('Models')")).to_be_hidden()  # closed again on the next page


def test_on_a_phone_tables_scroll_in_their_box_timeline_text_wraps_and_legends_clear_the_ticks(
        console, live_server, browser):
    page = log_in(browser, live_server.url, "bob", *PHONE)
    assert no_sideways_scroll(page)
    box = page.locator(".table-scroll").first
    assert box.evaluate("el => el.scrollWidth > el.clientWidth")  # the job list scrolls inside its own box

    job = console.jobs["failed"]  # a long failure sentence on its timeline
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    assert no_sideways_scroll(page)
    cut = page.evaluate("""[...document.querySelectorAll('.timeline .event .what')]
        .filter(el => el.scrollWidth > el.clientWidth + 1 || el.getBoundingClientRect().right >
                      el.closest('.card').getBoundingClientRect().right).length""")
    assert cut == 0, "timeline text is cut"

    page.goto(f"{live_server.url}/jobs/{console.jobs['running'].pk}/")
    page.wait_for_function("() => document.querySelectorAll('#job-live-charts .js-plotly-plot').length === 4")
    for chart in ("util", "mem", "lat", "exec"):
        overlap = page.evaluate(f"""() => {{
            const root = document.getElementById('job-chart-{chart}');
            const legend = root.querySelector('.legend').getBoundingClientRect();
            return [...root.querySelectorAll('.xtick text, .g-xtitle text')].some(t => {{
                const b = t.getBoundingClientRect();
                return !(b.right <= legend.left || legend.right <= b.left || b.bottom <= legend.top
                         || legend.bottom <= b.top);
            }});
        }}""")
        assert not overlap, f"{chart}: tick labels overlap the legend"
    shot(page, "phone-job-running")


def test_the_api_docs_fit_a_phone(live_server, browser):
    """Swagger UI had no viewport: a phone laid it out 980 px wide and shrank it to fit.
    A mobile context (is_mobile honours the viewport meta, as a phone does)."""
    from playwright.sync_api import expect

    from polling import DEADLINE_S

    context = browser.new_context(viewport={"width": PHONE[0], "height": PHONE[1]}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(DEADLINE_S * 1000)
    page.goto(f"{live_server.url}/api/v1/docs")
    submit = page.locator(".opblock-post:has(.opblock-summary-path[data-path='/api/v1/jobs'])")
    expect(submit).to_be_visible()
    assert page.evaluate("window.innerWidth") == PHONE[0]
    assert no_sideways_scroll(page)
    submit.locator(".opblock-summary").click()
    submit.locator("button.try-out__btn").click()
    expect(submit.locator("textarea.body-param__text")).to_be_visible()
    assert no_sideways_scroll(page)
    box = submit.locator("button.execute").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE[0]
    shot(page, "api-docs-phone")
    context.close()


# --- bug 8: the job list updates in place ---------------------------------------------------

def test_the_job_list_updates_status_duration_finished_and_reason_in_place(console, live_server, browser):
    from playwright.sync_api import expect

    job = console.jobs["pending"]
    page = log_in(browser, live_server.url, "bob", *DESKTOP)
    page.evaluate("window.__sameDocument = true")
    row = page.locator(f"tr[data-job='{job.pk}']")
    expect(row.locator("[data-cell='reason']")).to_contain_text("no trn2 host is online")
    expect(row.locator("[data-cell='duration']")).to_contain_text("waiting")

    host = neuron_host("trn2-a", cores=8, family="trn2")
    CoreAllocation.objects.bulk_create([CoreAllocation(host=host, core=c, job=job, team=job.team, family="trn2")
                                        for c in range(4)])
    assert states.mark_queued(job, host.pk, 0) and states.mark_running(job.pk, host.pk)
    expect(row.locator(".badge")).to_have_text("running")
    expect(row.locator("[data-cell='where']")).to_have_text("trn2-a · cores 0-3")
    expect(row.locator("[data-cell='reason']")).to_have_text("")
    states.mark_finished(job.pk, S.FAILED, failure="timed_out", reason="exceeded max runtime of 60 s",
                         message="timed out")
    expect(row.locator(".badge")).to_have_text("failed")
    expect(row.locator("[data-cell='reason']")).to_have_text("exceeded max runtime of 60 s")
    expect(row.locator("[data-cell='finished'] time")).to_have_count(1)
    expect(row.locator("[data-cell='duration']")).to_have_text(re.compile(r"^\d+(\.\d)? s$"))

    Job.objects.create(team=job.team, user=console.cast.bob, kind="inference", model=console.model)
    expect(page.locator("#new-jobs")).to_contain_text("1 new job")
    assert page.evaluate("window.__sameDocument") is True
    shot(page, "job-list-live")


# --- bug 3: the pending explanation goes with the badge -------------------------------------

def test_the_pending_explanation_disappears_with_the_same_update_as_the_badge(console, live_server, browser):
    from playwright.sync_api import expect

    job = console.jobs["pending"]
    page = log_in(browser, live_server.url, "bob", *DESKTOP)
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    expect(page.locator("#pending-why")).to_be_visible()
    # Record, at every change of the badge, whether the explanation was still shown.
    page.evaluate("""window.__seen = [];
        new MutationObserver(() => window.__seen.push([document.getElementById('job-status').textContent,
            document.getElementById('pending-why').hidden]))
          .observe(document.getElementById('job-status'), {childList: true, characterData: true, subtree: true});""")
    host = neuron_host("trn2-b", cores=8, family="trn2")
    CoreAllocation.objects.bulk_create([CoreAllocation(host=host, core=c, job=job, team=job.team, family="trn2")
                                        for c in range(4)])
    assert states.mark_queued(job, host.pk, 0) and states.mark_running(job.pk, host.pk)
    expect(page.locator("#job-status")).not_to_have_text("pending")
    seen = page.evaluate("window.__seen")
    assert seen and all(hidden for status, hidden in seen if status != "pending"), seen
    expect(page.locator("#pending-why")).to_be_hidden()


# --- bug 2: no empty axes; one sample is visible ----------------------------------------------

def test_job_charts_say_no_samples_then_show_a_lone_sample_as_a_marker(cast, tiny_model, clean_streams,  # noqa: F811
                                                                      live_server, browser):
    from playwright.sync_api import expect

    host = neuron_host("trn-c", cores=8)
    job = running_job(cast.vision, cast.bob, host, start=0, cores=2)
    page = log_in(browser, live_server.url, "bob", *DESKTOP)
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    sentence = page.locator("#job-live-charts [data-no-samples]")
    expect(sentence).to_be_visible()
    expect(sentence).to_contain_text("No samples yet")
    expect(page.locator("#job-live-charts [data-live-grid]")).to_be_hidden()
    assert not page.locator("#job-live-charts .xtick").first.is_visible()  # no empty axes on screen

    publish(host, job, {0: 40.0, 1: 20.0})
    expect(page.locator("#job-live-charts [data-live-grid]")).to_be_visible(timeout=10_000)
    expect(sentence).to_be_hidden()
    page.wait_for_function("() => document.getElementById('job-chart-util').data[0].x.length === 1")
    assert page.evaluate("document.getElementById('job-chart-util').data[0].mode") == "lines+markers"
    assert page.locator("#job-chart-util .scatterlayer .point").count() >= 1  # the lone sample is drawn
    shot(page, "job-one-sample")
    publish(host, job, {0: 60.0, 1: 30.0})
    page.wait_for_function("() => document.getElementById('job-chart-util').data[0].mode === 'lines'")


def test_a_job_that_ends_without_samples_says_so_live_and_after_a_reload(cast, tiny_model, clean_streams,  # noqa: F811
                                                                        live_server, browser):
    from playwright.sync_api import expect

    host = neuron_host("trn-d", cores=8)
    job = running_job(cast.vision, cast.bob, host, start=0, cores=2)
    page = log_in(browser, live_server.url, "bob", *DESKTOP)
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    sentence = page.locator("#job-live-charts [data-no-samples]")
    expect(sentence).to_contain_text("No samples yet")
    states.mark_finished(job.pk, S.SUCCEEDED, message="done")
    expect(sentence).to_contain_text("No samples were recorded for this job")
    live_text = sentence.inner_text()
    page.reload()
    expect(page.locator("#job-live-charts [data-no-samples]")).to_have_text(live_text)
    expect(page.locator("#job-live-charts [data-live-grid]")).to_have_count(0)


# --- bug 4: CPU hosts ---------------------------------------------------------------------------

def _cpu_point(host: Host, job: Job, util: float) -> dict:
    return {"ts": timezone.now().timestamp(), "kind": "host", "host": host.name, "util": {"0": util}, "mem": {},
            "device_mem": None, "host_mem": 300 << 20, "lat_p50": None, "lat_p99": None, "completed": 0,
            "errors": 0, "idle": []}


def test_a_cpu_jobs_charts_are_named_cpu_live_and_reloaded_and_only_those_it_can_fill(
        cast, tiny_model, clean_streams, live_server, browser):  # noqa: F811
    from playwright.sync_api import expect

    host = Host.objects.create(name="cpu-c", family="cpu", core_ids=list(range(4)), backend="cpu",
                               last_heartbeat=timezone.now())
    job = running_job(cast.vision, cast.bob, host, start=0, cores=1)
    page = log_in(browser, live_server.url, "bob", *DESKTOP)
    page.goto(f"{live_server.url}/jobs/{job.pk}/")

    def titles() -> list[str]:
        return page.evaluate("""[...document.querySelectorAll('#job-live-charts .js-plotly-plot')]
            .map(el => el.layout.title.text)""")

    page.wait_for_function("() => document.querySelectorAll('#job-live-charts .js-plotly-plot').length === 4")
    live_titles = titles()
    assert live_titles[0].startswith("CPU use of the job's slots") and "NeuronCore" not in " ".join(live_titles)
    expect(page.locator("#job-live-charts h2")).to_have_text("CPU use")
    clean_streams.xadd(metrics.job_key(job.pk), {"d": json.dumps(_cpu_point(host, job, 55.0))})
    page.wait_for_function("() => document.getElementById('job-chart-util').data[0].x.length === 1", timeout=10_000)
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#job-live-charts .js-plotly-plot').length === 4")
    assert titles() == live_titles
    # a cpu inference job reports its own request latency and completions (jobs.live.requests)
    assert page.locator("#job-chart-lat").count() == 1 and page.locator("#job-chart-exec").count() == 1
    assert page.evaluate("document.getElementById('job-chart-mem').data.length") == 1  # no device memory


def test_a_chart_stays_inside_its_card_while_points_arrive(console, live_server, browser):
    page = log_in(browser, live_server.url, "bob", 1000, 900)
    job = console.jobs["running"]
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    page.wait_for_function("() => document.getElementById('job-chart-util').data[0].x.length === 3")
    page.set_viewport_size({"width": 1300, "height": 900})
    publish(console.trn_host, job, {0: 90.0, 1: 45.0})
    page.wait_for_function("() => document.getElementById('job-chart-util').data[0].x.length === 4", timeout=10_000)
    page.set_viewport_size({"width": 920, "height": 900})
    publish(console.trn_host, job, {0: 91.0, 1: 46.0})
    page.wait_for_function("() => document.getElementById('job-chart-util').data[0].x.length === 5", timeout=10_000)
    outside = page.evaluate("""[...document.querySelectorAll('#job-live-charts .main-svg')].filter(svg =>
        svg.getBoundingClientRect().right > document.getElementById('job-live-charts').getBoundingClientRect().right + 1
    ).length""")
    assert outside == 0


# --- bug 9: the fleet heatmap ---------------------------------------------------------------------

@pytest.mark.parametrize("size", [DESKTOP, PHONE])
def test_the_fleet_colour_bar_labels_do_not_overlap_and_the_host_links_belong_to_the_card(
        console, live_server, browser, size):
    page = log_in(browser, live_server.url, "bob", *size)
    publish(console.trn_host, console.jobs["running"], {0: 70.0, 1: 30.0})
    page.goto(f"{live_server.url}/fleet/")
    page.wait_for_function("() => document.querySelector('#fleet-chart .colorbar')")
    labels = page.evaluate("""[...document.querySelectorAll('#fleet-chart .colorbar text')]
        .filter(t => t.textContent.trim()).map(t => {const b = t.getBoundingClientRect();
            return {text: t.textContent, x: b.x, y: b.y, width: b.width, height: b.height};})""")
    assert len(labels) >= 4, labels  # 0, 50, 100 and the title
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            assert not boxes_overlap(a, b), f"colour bar labels overlap: {a['text']!r} and {b['text']!r}"
    assert page.locator("#fleet-live .host-links a").count() == 2
    assert page.locator(".host-links").count() == page.locator("#fleet-live .host-links").count()
    assert no_sideways_scroll(page)
    shot(page, f"fleet-{size[0]}")


# --- bug 10 and forms ------------------------------------------------------------------------------

def test_job_facts_labels_stay_in_their_column_and_cancel_asks_first(console, live_server, browser):
    from playwright.sync_api import expect

    job = console.jobs["pending"]
    page = log_in(browser, live_server.url, "bob", *DESKTOP)
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    spill = page.evaluate("""[...document.querySelectorAll('.facts-grid > div')].filter(cell =>
        [...cell.querySelectorAll('dt, dt *')].some(el => el.getBoundingClientRect().right >
                                                  cell.getBoundingClientRect().right + 1)).length""")
    assert spill == 0, "a fact's label runs into the next column"

    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("#cancel-form button")
    expect(page.locator("#job-status")).to_have_text("pending")
    assert Job.objects.get(pk=job.pk).status == S.PENDING  # said no: nothing happened
    page.evaluate("""sessionStorage.removeItem('busy');
        new MutationObserver(() => {
            const button = document.querySelector('#cancel-form button');
            if (button.disabled) sessionStorage.setItem('busy', JSON.stringify([button.disabled, button.textContent]));
        }).observe(document.querySelector('#cancel-form button'), {attributes: true})""")
    messages = []
    page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    page.click("#cancel-form button")
    expect(page.locator(".message-success")).to_contain_text(f"Cancel of job #{job.pk} requested")
    assert messages and f"Cancel job #{job.pk}?" in messages[0]
    assert json.loads(page.evaluate("sessionStorage.getItem('busy')")) == [True, "Cancelling…"]
    assert Job.objects.get(pk=job.pk).status == S.CANCELLED


def test_compile_help_keeps_each_flag_on_one_line(console, live_server, browser):
    page = log_in(browser, live_server.url, "bob", *PHONE)
    page.goto(f"{live_server.url}/teams/vision/jobs/new/compile/")
    heights = page.evaluate("""[...document.querySelectorAll('.help code, .allow-list code')]
        .map(el => [el.textContent, el.getClientRects().length])""")
    assert heights and all(lines == 1 for _, lines in heights), heights
    assert no_sideways_scroll(page)


def test_the_job_form_preselects_the_lone_model_offers_one_prompt_choice_and_marks_families(
        console, live_server, browser):
    from playwright.sync_api import expect

    page = log_in(browser, live_server.url, "bob", *DESKTOP)
    page.goto(f"{live_server.url}/teams/vision/jobs/new/inference/")
    assert page.input_value("#id_model") == str(console.model.pk)
    family = page.locator("#id_family")
    assert family.locator("option[value='trn2']").inner_text() == "Trainium2 (no host online)"
    assert family.locator("option[value='trn1']").inner_text() == "Trainium"  # trn-walk is online
    # cores in all: up to 128 per host, on up to MAX_HOSTS hosts
    expect(page.locator("#id_cores_limit")).to_have_text(f"1–{128 * MAX_HOSTS:,}")
    expect(page.locator("#id_max_runtime_s_limit")).to_contain_text("86,400 s")
    expect(page.locator("#cores-note")).to_contain_text("up to 16 cpu cores")
    family.select_option("trn2")
    expect(page.locator("#cores-note")).to_contain_text("No trn2 host is online")

    expect(page.locator("#id_prompts")).to_be_visible()
    expect(page.locator("#id_prompts_file")).to_be_hidden()
    page.check("input[name=prompts_source][value=file]")
    expect(page.locator("#id_prompts")).to_be_hidden()
    expect(page.locator("#id_prompts_file")).to_be_visible()
    assert page.evaluate("document.getElementById('id_prompts').disabled") is True
    page.check("input[name=prompts_source][value=text]")
    page.fill("#id_prompts", "hello")
    family.select_option("cpu")
    page.click("button:has-text('Submit inference job')")
    page.wait_for_url(re.compile(r"/jobs/\d+/$"))
    assert Job.objects.filter(kind="inference", status=S.PENDING, spec__prompts=["hello"]).exists()
    shot(page, "submitted-from-form")


def test_an_upload_shows_progress_with_its_button_disabled_then_the_result(console, live_server, browser,
                                                                        demo_dataset_file):
    from playwright.sync_api import expect

    page = log_in(browser, live_server.url, "bob", *DESKTOP)
    page.goto(f"{live_server.url}/teams/vision/datasets/")
    page.evaluate("""sessionStorage.setItem('seen', '[]');
        new MutationObserver(() => {
            const seen = JSON.parse(sessionStorage.getItem('seen'));
            const button = document.querySelector('form[enctype] button[type=submit]');
            const bar = document.querySelector('.upload-progress');
            seen.push([button ? button.disabled : null, button ? button.textContent : '', Boolean(bar)]);
            sessionStorage.setItem('seen', JSON.stringify(seen));
        }).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});""")
    page.fill("#id_name", "walk-upload")
    page.set_input_files("#id_file", str(demo_dataset_file))
    page.click("button:has-text('Upload dataset')")
    expect(page.locator(".message-success")).to_contain_text("Dataset walk-upload uploaded")
    assert page.url.endswith("/teams/vision/datasets/")
    seen = json.loads(page.evaluate("sessionStorage.getItem('seen')"))
    assert any(disabled and bar for disabled, _, bar in seen), seen  # disabled, with a progress bar
    assert any(text.startswith(("Uploading", "Checking")) for _, text, _ in seen), seen
    expect(page.locator("tr:has-text('walk-upload')")).to_have_count(1)


def test_a_new_tokens_copy_button_copies_it(console, live_server, browser):
    page = log_in(browser, live_server.url, "bob", *DESKTOP)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server.url)
    page.goto(f"{live_server.url}/tokens/")
    page.fill("#id_name", "laptop")
    page.click("button:has-text('Create token')")
    token = page.locator("#new-token").inner_text().strip()
    assert token.startswith("nd_")
    page.click("#copy-token")
    page.wait_for_function("() => document.getElementById('copy-token').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == token


# --- staff create teams ----------------------------------------------------------------------------

def test_staff_create_a_team_in_the_console_and_add_a_member_with_a_role(console, live_server, browser):
    from playwright.sync_api import expect

    page = log_in(browser, live_server.url, "admin", *DESKTOP)
    page.click(".team-switcher summary")
    page.click("a:has-text('New team…')")
    page.wait_for_url(re.compile(r"/teams/new/$"))
    page.fill("#id_slug", "speech")
    page.fill("#id_name", "Speech")
    page.fill("#id_manager", "alice")
    page.click("button:has-text('Create team')")
    page.wait_for_url(re.compile(r"/teams/speech/$"))
    expect(page.locator(".message-success")).to_contain_text("Team speech created")
    page.fill("#id_username", "bob")
    page.select_option("#id_role", "viewer")
    page.click("#members button:has-text('Add')")
    page.wait_for_url(re.compile(r"/teams/speech/$"))
    expect(page.locator("#members tr[data-user='bob']")).to_contain_text("viewer")
    expect(page.locator("#members tr[data-user='alice']")).to_contain_text("manager")
    team = Team.objects.get(slug="speech")
    assert FamilyQuota.objects.filter(team=team).count() == 4
    assert Membership.objects.get(team=team, user=console.cast.bob).role == "viewer"
    assert AuditEntry.objects.filter(team=team, subject="team").exists()
    page.goto(f"{live_server.url}/quotas/")
    assert page.locator("#team-speech button:has-text('Save')").is_visible()
    shot(page, "team-created")


# --- empty states ----------------------------------------------------------------------------------

def test_empty_pages_say_what_to_do_next(cast, live_server, browser):
    from playwright.sync_api import expect

    page = log_in(browser, live_server.url, "charlie", *PHONE)  # team audio: no model, no job, no host
    expect(page.locator("#no-jobs")).to_contain_text("Upload a model")
    page.click("#no-jobs a:has-text('Upload a model')")
    page.wait_for_url(re.compile(r"/teams/audio/models/$"))
    expect(page.locator("#no-models")).to_contain_text("Hugging Face")
    page.goto(f"{live_server.url}/teams/audio/datasets/")
    expect(page.locator("#no-datasets")).to_contain_text("JSONL")
    page.goto(f"{live_server.url}/teams/audio/usage/")
    expect(page.locator("#no-usage")).to_contain_text("No usage in this range yet")
    page.goto(f"{live_server.url}/hosts/")
    expect(page.locator("#no-hosts")).to_contain_text("manage.py agent")
    page.goto(f"{live_server.url}/fleet/")
    expect(page.locator("#no-hosts")).to_contain_text("No hosts online")
    page.goto(f"{live_server.url}/tokens/")
    expect(page.locator(".empty")).to_contain_text("Create one")
    assert no_sideways_scroll(page)
    shot(page, "empty-tokens-phone")


# --- bug 6: styled error pages, no debug listing ---------------------------------------------------

def test_a_missing_page_is_styled_and_lists_no_urls(console, live_server, browser):
    page = log_in(browser, live_server.url, "alice", *PHONE)
    response = page.goto(f"{live_server.url}/usage/")  # staff only: as if it did not exist
    assert response.status == 404
    assert page.locator("#error-page h1").inner_text() == "There is no such page"
    assert "URLconf" not in page.content()
    assert page.locator("#topbar .team-switcher").count() == 1  # the navigation is there to go back
    assert no_sideways_scroll(page)
    shot(page, "404-phone")
