"""The worker service: requests, the node registry and plans over HTTP (``williw worker``).

Layers, outermost first: ``app`` (FastAPI routes, a shell), ``service`` (what a route asks for: fetch metadata,
pick online nodes, call the planner), ``auth`` (admin and node tokens), ``store`` (the only SQL), ``schema``
(tables and migrations). Nothing here is imported by ``import williw``; fastapi and sqlalchemy load only when
the service or its store is used.
"""
