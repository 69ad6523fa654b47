"""The routing mesh: every service port served on every node, spread over replicas.

``endpoints`` and ``routes`` say where a service's ready replicas are,
``balancing``, ``outlier`` and ``router`` choose one per connection or
request, ``tcp`` and ``http`` forward, and ``mesh`` keeps the listeners in
step with the routes.
"""
