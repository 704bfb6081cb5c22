// Stress test for libpcache's Cache used by several threads at once, the way LazyFS's FUSE
// threads use it: items are locked and unlocked while other threads add and remove items.
// Usage: cache_stress SECONDS. Exit 0 when every thread finished; a race crashes or hangs it.
#include <cache/cache.hpp>
#include <cache/config/config.hpp>
#include <cache/engine/backends/custom/custom_cache.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

using cache::Cache;
using cache::engine::backends::custom::CustomCacheEngine;

// Items each churn thread keeps: a few (each reserves about 240 KB) yet enough to keep rehashing.
static const long KEPT = 40;

int main (int argc, char** argv) {
    const double seconds = argc > 1 ? std::atof (argv[1]) : 2.0;
    cache::config::Config config (16 << 20, 1);
    CustomCacheEngine engine (&config);
    Cache lib (&config, &engine);
    std::atomic<bool> stop (false);
    std::atomic<long> ops (0);
    std::vector<std::thread> threads;

    // Writers: a block written to a file of their own, its size read back (lfs_write, lfs_getattr).
    for (int w = 0; w < 2; w++) {
        threads.emplace_back ([&, w] {
            const std::string cid = "w" + std::to_string (w);
            const char byte       = 'x';
            while (!stop) {
                lib.put_data_blocks (cid, {{0, {&byte, 1, 0, 0}}}, OP_WRITE);
                if (lib.lockItemCheckExists (cid)) {
                    lib.get_content_metadata (cid);
                    lib.unlockItem (cid);
                }
                lib.is_block_cached (cid, 0);
                ops++;
            }
        });
    }
    // Churn: files created, looked at and removed (lfs_create, lfs_unlink), growing the tables.
    for (int c = 0; c < 2; c++) {
        threads.emplace_back ([&, c] {
            for (long n = 0; !stop; n++) {
                const std::string cid = "c" + std::to_string (c) + "_" + std::to_string (n);
                lib.put_data_blocks (cid, {}, OP_PASSTHROUGH);
                lib.has_content_cached (cid);
                if (n >= KEPT) {
                    const std::string old = "c" + std::to_string (c) + "_" + std::to_string (n - KEPT);
                    lib.remove_cached_item (old, old.c_str (), true);
                }
                ops++;
            }
        });
    }
    std::this_thread::sleep_for (std::chrono::duration<double> (seconds));
    stop = true;
    for (auto& t : threads)
        t.join ();
    std::printf ("ok: %ld operations\n", ops.load ());
    return 0;
}
