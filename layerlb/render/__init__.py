"""Renderers: a Plan in, a text configuration out, through the jinja2 templates in `templates/`.

`formats` is the entry point by format name (`dataplane`, `ipvs`, `nftables`, `haproxy`); each text format
has its own module (`ipvs_rules`, `nftables_ruleset`, `haproxy_config`) over `shared`. The package imports
nothing itself, so the kernel engines load their own format's module without the HAProxy code.
"""
