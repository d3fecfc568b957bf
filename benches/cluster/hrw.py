"""Which node owns a room: rendezvous hashing as src/cluster/hrw.rs does it (FNV-1a over
the node id, a 0xff byte and the room id, then the SplitMix64 finalizer; the highest
score owns). Imported by the scripts in benches/cluster/ (PYTHONPATH=benches/cluster)."""

M = (1 << 64) - 1


def score(node, room):
    h = 0xCBF29CE484222325
    for b in node.encode() + b"\xff" + room.encode():
        h = ((h ^ b) * 0x100000001B3) & M
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & M
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & M
    return h ^ (h >> 31)


def owner(room, nodes):
    return max(nodes, key=lambda n: score(n, room))
