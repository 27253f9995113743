"""The edge: TLS (optionally mutual TLS) and slow-client bounds in front of Ray's own HAProxy.

Ray 2.60's HAProxy (``ray/serve/_private/haproxy_templates.py``) renders no ``ssl`` on its bind
lines and never sets ``timeout http-request``; its settings come only from ``RAY_SERVE_HAPROXY_*``
variables, none of which adds either. So a second HAProxy, the same binary ``ray[serve]`` bundles,
owns the public ports and forwards to Ray's HAProxy on this node's internal ports
(docs/edge.md): :mod:`.config` (typed settings), :mod:`.haproxy_config` (rendering, pure),
:mod:`.supervisor` (start, reload, stop), ``python -m ray_app.edge`` (the command line).
"""
