"""mii's gRPC deployments: the replicas, the balancer, the REST gateway."""

import os

# grpc's C core writes INFO lines of its own to standard error unless told its
# verbosity ("I1206 ... chttp2_transport.cc ... Got goaway" when a connection closes
# during a failed start): they showed up in mii serve's output, before mii's own
# error line. Errors still print; a user's own GRPC_VERBOSITY wins. Set before any
# module of this package imports grpc, and inherited by the deployment's processes.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
