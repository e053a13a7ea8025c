"""session-reaper's Jupyter kernel provisioner: every kernel a session-reaper session.

Entry point ``session-reaper-provisioner`` in the ``jupyter_client.kernel_provisioners``
group; see :mod:`session_reaper_jupyter.provisioner`.
"""

__version__ = "0.1.0"

from .client import ReaperApiError, ReaperClient, ReaperUnreachable, default_socket  # noqa: E402
from .provisioner import ReaperProvisioner  # noqa: E402

__all__ = ["ReaperApiError", "ReaperClient", "ReaperProvisioner", "ReaperUnreachable", "default_socket"]
