"""pipelines.heap gives freed C-heap pages back, which free() alone does not (below the top)."""

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import sys
    from pipelines.heap import release_free_heap

    def anon_mb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024

    # 200 MB of 4 KB blocks from malloc (above pymalloc's 512 bytes, below mmap's threshold),
    # then one block above them, so that freeing the others leaves a hole below the heap's top
    blocks = [bytearray(4096) for _ in range(50_000)]
    top = bytearray(4096)
    filled = anon_mb()
    del blocks
    freed = anon_mb()
    released = release_free_heap()
    trimmed = anon_mb()
    print(filled, freed, trimmed, released)
""")


def test_release_free_heap_returns_freed_pages_that_free_kept():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True).stdout.split()
    filled, freed, trimmed = map(float, out[:3])
    assert out[3] == "True"  # glibc, on the Linux machines the builder runs on
    assert freed > filled - 50  # free() kept most of the 200 MB resident
    assert trimmed < freed - 150  # the trim gave it back
