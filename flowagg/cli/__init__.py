"""The `flowagg` and `flowagg-bridge` commands: click commands, the socket client, the
provider bridge and `top`.

May import: every other subpackage; nothing imports `cli`.
"""
