"""The REST API's routers, one per resource; ``lorafleet.service.app.create_app`` mounts them.

``deps`` holds what every router shares (the ``Service`` context, the tenant dependency, path and query
parameter types); ``limits`` the request-size middleware. The routers never import torch.
"""

__all__: list[str] = []
