"""The fleet compile cache's size against its cap, for the usage pages."""
from django import template
from django.template.defaultfilters import filesizeformat
from django.utils.html import format_html

register = template.Library()


@register.simple_tag
def compile_cache_usage() -> str:
    from jobs.compile_cache.index import fleet_usage

    usage = fleet_usage()
    cap = f" of {filesizeformat(usage['cap_bytes'])} cap" if usage["cap_bytes"] else " (no cap)"
    return format_html('<div><dt>Compile cache (fleet)</dt><dd data-metric="compile-cache">{}{} '
                       '<span class="muted">({} configurations, {} pinned)</span></dd></div>',
                       filesizeformat(usage["size_bytes"]), cap, usage["entries"],
                       filesizeformat(usage["pinned_bytes"]))
