"""The OCI registry as a shared cache: credentials, the auth handshake, the client, the artifact format,
pushing and pulling images and warm sets, and the glue the bake and the tasks use.

The top stage of the engine: may import every package below it; none of them imports it.
"""
