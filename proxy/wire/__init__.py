"""MongoDB wire protocol: framing, OP_MSG, legacy OP_QUERY/OP_REPLY, compression.

Nothing in this package knows about branches or upstreams.
"""
