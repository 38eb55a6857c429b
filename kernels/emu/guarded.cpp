// Guarded host buffers for emulated kernels (src/emulator/buffer.rs) and the fault handler
// that names an overrun.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <mutex>

// ---- guarded buffers: out-of-bounds accesses fault, and the fault names the buffer ----------
// The emulator's memcheck: a buffer's last byte sits within 15 bytes (16-byte alignment) of a
// PROT_NONE page, so a kernel reading or writing past its end faults at once; the handler says
// how far past which buffer, then lets the fault kill the process as it would have anyway.
namespace {
struct Guarded {
    char* base;        // mapping start (a guard page)
    size_t map_len;
    const char* data;  // first byte handed out
    size_t bytes;
};
constexpr int MAX_GUARDED = 8192;
Guarded g_guarded[MAX_GUARDED];  // read lock-free by the signal handler; entries with base == null are free
std::mutex g_guarded_lock;
struct sigaction g_prev_segv;
std::once_flag g_handler_once;

void put_str(const char* s) { ssize_t r = write(2, s, strlen(s)); (void)r; }
void put_num(unsigned long long v) {
    char buf[24];
    int i = 23;
    buf[i] = 0;
    do {
        buf[--i] = static_cast<char>('0' + v % 10);
        v /= 10;
    } while (v);
    put_str(buf + i);
}

void on_segv(int sig, siginfo_t* info, void* ctx) {
    const char* a = static_cast<const char*>(info->si_addr);
    for (const Guarded& g : g_guarded) {
        if (g.base == nullptr || a < g.base || a >= g.base + g.map_len) continue;
        put_str("\nrope-attn SIMT emulator: out-of-bounds access by a kernel: ");
        if (a >= g.data + g.bytes) {
            put_num(static_cast<unsigned long long>(a - (g.data + g.bytes)));
            put_str(" bytes past the end of a ");
        } else {
            put_num(static_cast<unsigned long long>(g.data - a));
            put_str(" bytes before the start of a ");
        }
        put_num(g.bytes);
        put_str("-byte buffer\n");
        break;
    }
    // Hand the fault on (Rust's stack-overflow handler, or the default action: terminate).
    if (g_prev_segv.sa_flags & SA_SIGINFO) {
        if (g_prev_segv.sa_sigaction) return g_prev_segv.sa_sigaction(sig, info, ctx);
    } else if (g_prev_segv.sa_handler != SIG_IGN && g_prev_segv.sa_handler != SIG_DFL && g_prev_segv.sa_handler) {
        return g_prev_segv.sa_handler(sig);
    }
    signal(SIGSEGV, SIG_DFL);  // returning re-executes the access, which now terminates
}

void install_handler() {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_prev_segv);
}
}  // namespace

// `bytes` (> 0) of zeroed memory, 16-byte aligned, ending within 15 bytes of an inaccessible page
// (and with one before the first page). Null if the mapping fails or too many are live.
extern "C" void* ra_emu_guarded_alloc(size_t bytes) {
    if (bytes == 0) return nullptr;
    std::call_once(g_handler_once, install_handler);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t span = (bytes + 15) & ~size_t(15), pages = (span + page - 1) / page, map_len = (pages + 2) * page;
    char* base = static_cast<char*>(mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base == MAP_FAILED) return nullptr;
    mprotect(base, page, PROT_NONE);
    mprotect(base + (pages + 1) * page, page, PROT_NONE);
    char* data = base + (pages + 1) * page - span;
    std::lock_guard<std::mutex> lock(g_guarded_lock);
    for (Guarded& g : g_guarded)
        if (g.base == nullptr) {
            g.map_len = map_len;
            g.data = data;
            g.bytes = bytes;
            __atomic_store_n(&g.base, base, __ATOMIC_RELEASE);
            return data;
        }
    munmap(base, map_len);
    return nullptr;
}

extern "C" void ra_emu_guarded_free(void* data) {
    if (data == nullptr) return;
    std::lock_guard<std::mutex> lock(g_guarded_lock);
    for (Guarded& g : g_guarded)
        if (g.base != nullptr && g.data == data) {
            char* base = g.base;
            __atomic_store_n(&g.base, static_cast<char*>(nullptr), __ATOMIC_RELEASE);
            munmap(base, g.map_len);
            return;
        }
}
