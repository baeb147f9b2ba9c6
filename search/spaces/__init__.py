"""Search spaces: supernets with gated channels and operators (see :mod:`search.spaces.base` for the protocol)."""

from search.spaces.base import SPACES, LatencyLayer, SearchSpace, create_space, from_architecture, list_spaces

__all__ = ["SPACES", "LatencyLayer", "SearchSpace", "create_space", "from_architecture", "list_spaces"]
