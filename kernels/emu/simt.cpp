// The SIMT emulator's runtime (see simt.h): fibers for CUDA threads, a block scheduler with
// barrier and collective checking, the warp collectives computed from all lanes' operands, and
// the launch entry point the Rust side calls (src/emulator/). Number formats: numerics.cpp;
// guarded buffers: guarded.cpp.
#include "simt.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <map>
#include <mutex>
#include <utility>
#include <string>
#include <vector>

// ---- racecheck (feature `racecheck`): the block's happens-before, told to ThreadSanitizer ------
// With RA_EMU_RACECHECK the kernels are compiled with -fsanitize=thread (this runtime is not:
// its own bookkeeping is no kernel's access) and each CUDA thread is a TSan fiber, switched
// without implied ordering. The only orderings declared are the ones CUDA's memory model gives:
// __syncthreads among the block, __syncwarp among the warp, and the start and end of a block
// (blocks run one after another here, and launches as kernels on one stream do; so two blocks
// of one grid writing the same global bytes are *not* reported: the blocks share this runtime's
// shared memory and fiber stacks, which only that order makes race-free). Shuffles,
// votes, ldmatrix and mma.sync order nothing, as on the GPU. What the kernels' own loads and
// stores do not show is annotated here: a cp.async writes its 16 bytes at the issue and again at
// the wait that retires it (it lands at some moment between), and reads its source at the issue;
// ldmatrix reads each lane's row as that lane. Any access of shared (or global) memory by two
// threads with no such ordering between them, one a write, is then a ThreadSanitizer report:
// compute-sanitizer's racecheck, on the CPU, for every interleaving rather than the one a run took.
#ifdef RA_EMU_RACECHECK
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);

// ThreadSanitizer's hooks (build.rs exports them from the executable, so that the runtime finds
// them): its default options, and a count of its reports, by which a launch with a race fails.
// Accesses made inside libc's interceptors (memcpy, calloc, ...) are ignored: the host code that
// makes them (Rust's, this runtime's) orders itself by means TSan cannot see, and a kernel
// thread's own loads and stores are instrumented where they stand.
// A report is made on the OS thread whose fiber made the second access, the thread that runs the
// launch: the count is per thread, so a race fails its own launch and no other test's. The exit
// code stays 0 (a report is a failed launch; the selftest's planted races are expected), and no
// report is held back as a repeat of an earlier one (same stacks or address): every racy launch fails.
static thread_local unsigned long g_race_reports = 0;
extern "C" const char* __tsan_default_options() {
    return "halt_on_error=0 exitcode=0 report_signal_unsafe=0 ignore_interceptors_accesses=1 suppress_equal_stacks=0 suppress_equal_addresses=0";
}
extern "C" void __tsan_on_report(const void*) { ++g_race_reports; }
#endif

namespace ra_emu {
namespace race {
// Fibers acquire it as they start and release it as they end; the scheduler acquires it before
// a block's fills and releases it after them, and acquires it again after the grid.
static char g_order;
#ifdef RA_EMU_RACECHECK
inline unsigned long reports() { return g_race_reports; }
inline void acquire(const void* a) { __tsan_acquire(const_cast<void*>(a)); }
inline void release(const void* a) { __tsan_release(const_cast<void*>(a)); }
inline void read(const void* p, size_t n) { __tsan_read_range(const_cast<void*>(p), n); }
inline void write(void* p, size_t n) { __tsan_write_range(p, n); }
inline void* create_fiber() { return __tsan_create_fiber(0); }
inline void destroy_fiber(void* f) { __tsan_destroy_fiber(f); }
inline void* current_fiber() { return __tsan_get_current_fiber(); }
inline void switch_to(void* f) { __tsan_switch_to_fiber(f, __tsan_switch_to_fiber_no_sync); }
inline void name_fiber(void* f, const char* n) { __tsan_set_fiber_name(f, n); }
#else
inline unsigned long reports() { return 0; }
inline void acquire(const void*) {}
inline void release(const void*) {}
inline void read(const void*, size_t) {}
inline void write(void*, size_t) {}
inline void* create_fiber() { return nullptr; }
inline void destroy_fiber(void*) {}
inline void* current_fiber() { return nullptr; }
inline void switch_to(void*) {}
inline void name_fiber(void*, const char*) {}
#endif
}  // namespace race

thread_local ThreadState* tls_thread = nullptr;
thread_local Counters tls_counters = {0, 0, 0, 0};
thread_local BlockState* tls_block = nullptr;

// ---- the kernel registry -------------------------------------------------------------------
struct KernelInfo {
    Entry entry;
    size_t params_size;
    int max_threads;
};
static std::map<std::string, KernelInfo>& registry() {
    static std::map<std::string, KernelInfo> r;  // filled by static constructors, read after main starts
    return r;
}
Registrar::Registrar(const char* name, Entry entry, size_t params_size, int max_threads) {
    registry()[name] = KernelInfo{entry, params_size, max_threads};
}

// ---- fibers ---------------------------------------------------------------------------------
// A context switch saves the callee-saved registers on the old stack and resumes the new one.
#if defined(__x86_64__)
extern "C" void ra_emu_switch(void** save_sp, void* new_sp);
extern "C" void ra_emu_fiber_entry();
asm(R"(
    .text
    .globl ra_emu_switch
    .hidden ra_emu_switch
    .type ra_emu_switch,@function
ra_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ra_emu_switch, .-ra_emu_switch

    .globl ra_emu_fiber_entry
    .hidden ra_emu_fiber_entry
    .type ra_emu_fiber_entry,@function
ra_emu_fiber_entry:
    call ra_emu_fiber_main
    ud2
    .size ra_emu_fiber_entry, .-ra_emu_fiber_entry
)");

struct Context {
    void* sp = nullptr;
};
static void context_init(Context& c, char* stack_lo, size_t size) {
    // Stack top 16-byte aligned; `ret` in ra_emu_switch lands on ra_emu_fiber_entry with rsp
    // aligned as a call expects. Six zeroed callee-saved registers and the default MXCSR / x87 CW.
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack_lo) + size) & ~uintptr_t(15);
    uint64_t* s = reinterpret_cast<uint64_t*>(top);
    s[-1] = reinterpret_cast<uint64_t>(&ra_emu_fiber_entry);
    for (int i = 2; i <= 7; ++i) s[-i] = 0;
    const uint32_t csr[2] = {0x1f80u, 0x037fu};
    std::memcpy(&s[-8], csr, 8);
    c.sp = &s[-8];
}
static void context_switch(Context& from, Context& to) { ra_emu_switch(&from.sp, to.sp); }
#else
}  // namespace ra_emu
#include <ucontext.h>
extern "C" void ra_emu_fiber_main();
namespace ra_emu {
struct Context {
    ucontext_t uc;
};
static void context_init(Context& c, char* stack_lo, size_t size) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack_lo;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, ra_emu_fiber_main, 0);
}
static void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

enum State { RUN, WAIT_BLOCK, WAIT_WARP, DONE };
enum Collective { C_NONE, C_SYNCWARP, C_SHFL, C_LDMATRIX, C_MMA, C_VOTE };
static const char* collective_name(int c) {
    static const char* n[] = {"none", "__syncwarp", "a shuffle", "ldmatrix", "mma.sync", "a vote"};
    return n[c];
}

struct Copy {
    void* dst;
    const void* src;  // null: zero-fill
};
struct Group {
    std::vector<Copy> copies;
    bool landed;
};

struct Fiber : ThreadState {
    Context ctx;
    int lane = 0, warp = 0, parity = 0;
    int barriers = 0;  // __syncthreads passed (racecheck: which of the two barrier objects is next)
    State state = RUN;
    Collective waiting = C_NONE;
    std::vector<Copy> open;    // cp.async issued, not yet committed
    std::vector<Group> groups;  // committed, not yet retired by a wait (oldest first)
    void* race = nullptr;       // racecheck: this thread's TSan fiber
};

// Per-warp exchange slots, double-buffered so that one barrier per collective suffices: a lane
// can only reuse a buffer after every lane has passed the next collective's barrier. (The same
// argument lets racecheck order each __syncwarp through one of two objects, by that parity.)
struct WarpSlots {
    uint32_t w[2][32][8];
    char order[2];
};

// A kernel's static __shared__ arrays, carved on first use out of one arena per launch (48 KiB,
// a GPU block's static limit), which the scheduler fills with NaN before each block: no thread
// of the block allocates or fills it (under racecheck that would be a write no other thread is
// ordered after).
constexpr size_t STATIC_SMEM_BYTES = 48 * 1024, STATIC_SMEM_KEYS = 16;
struct StaticSmem {
    const void* key;
    size_t offset;
};

// Dynamic shared memory in a guarded buffer (guarded.cpp): a kernel that addresses past the end
// of what its launcher sized faults at once, naming the overrun, as it would corrupt on a GPU.
extern "C" void* ra_emu_guarded_alloc(size_t bytes);
extern "C" void ra_emu_guarded_free(void* data);
struct SharedBytes {
    unsigned char* p = nullptr;
    size_t n = 0;
    SharedBytes() = default;
    SharedBytes(const SharedBytes&) = delete;
    SharedBytes& operator=(const SharedBytes&) = delete;
    ~SharedBytes() {
        if (p) ra_emu_guarded_free(p);
    }
    bool allocate(size_t bytes) {
        n = bytes;
        if (bytes == 0) return true;
        p = static_cast<unsigned char*>(ra_emu_guarded_alloc(bytes));
        return p != nullptr;
    }
    unsigned char* data() const { return p; }
    size_t size() const { return n; }
    bool empty() const { return n == 0; }
};

struct Launch : BlockState {
    std::vector<Fiber> fibers;
    std::vector<WarpSlots> warps;
    SharedBytes smem;
    std::vector<StaticSmem> static_smem;          // the arrays met so far (capacity reserved: never reallocated in a block)
    std::vector<unsigned char> static_arena;      // their bytes, STATIC_SMEM_BYTES
    size_t static_used = 0;
    Context sched;
    void* sched_race = nullptr;  // racecheck: the launching thread's TSan context
    char barrier_order[2];       // racecheck: __syncthreads k releases and acquires [k % 2]
    Entry entry = nullptr;
    const void* params = nullptr;
    uint64_t rng = 0;
    std::string error;
};
static thread_local Launch* tls_launch = nullptr;

static uint64_t next_random(Launch& L) {  // xorshift64*
    L.rng ^= L.rng >> 12;
    L.rng ^= L.rng << 25;
    L.rng ^= L.rng >> 27;
    return L.rng * 0x2545F4914F6CDD1DULL;
}

static Fiber& me() { return *static_cast<Fiber*>(tls_thread); }

static void yield_to_scheduler() {
    race::switch_to(tls_launch->sched_race);
    context_switch(me().ctx, tls_launch->sched);
}

// Stop the launch: record the first error and leave this fiber for good.
static void fail(const char* fmt, ...) {
    Launch& L = *tls_launch;
    if (L.error.empty()) {
        char buf[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        const Fiber& f = me();
        char where[128];
        snprintf(where, sizeof where, " (block %u,%u,%u thread %u)", L.bid.x, L.bid.y, L.bid.z, f.tid.x);
        L.error = std::string(buf) + where;
    }
    race::release(&race::g_order);  // (the launch is torn down after this thread's accesses)
    for (;;) yield_to_scheduler();
}

}  // namespace ra_emu

extern "C" void ra_emu_fiber_main() {
    using namespace ra_emu;
    race::acquire(&race::g_order);  // after the block's fill, and every earlier block
    tls_launch->entry(tls_launch->params);
    race::release(&race::g_order);
    me().state = DONE;
    yield_to_scheduler();
    __builtin_unreachable();
}

namespace ra_emu {

void* dynamic_smem() { return tls_launch->smem.data(); }

void* static_smem(const void* key, size_t bytes) {
    Launch& L = *tls_launch;
    for (const StaticSmem& st : L.static_smem)
        if (st.key == key) return L.static_arena.data() + st.offset;
    const size_t offset = (L.static_used + 15) & ~size_t(15);
    if (offset + bytes > L.static_arena.size() || L.static_smem.size() == STATIC_SMEM_KEYS)
        fail("static shared memory past %zu bytes in %zu arrays", L.static_arena.size(), STATIC_SMEM_KEYS);
    L.static_smem.push_back(StaticSmem{key, offset});
    L.static_used = offset + bytes;
    return L.static_arena.data() + offset;
}

void syncthreads() {
    Fiber& f = me();
    const char* order = &tls_launch->barrier_order[f.barriers & 1];
    race::release(order);
    f.state = WAIT_BLOCK;
    yield_to_scheduler();
    race::acquire(order);
    ++f.barriers;
}

// Publish this lane's operands, wait for the whole warp, return the slots of all 32 lanes.
static uint32_t (*exchange(Collective kind, const uint32_t* words, int n))[8] {
    Fiber& f = me();
    uint32_t(*slots)[8] = tls_launch->warps[f.warp].w[f.parity];
    std::memcpy(slots[f.lane], words, 4 * n);
    f.parity ^= 1;
    f.state = WAIT_WARP;
    f.waiting = kind;
    yield_to_scheduler();
    f.waiting = C_NONE;
    return slots;
}

static void check_full_mask(unsigned mask, const char* what) {
    if (mask != 0xffffffffu) fail("%s with mask %#x: the kernels only use full-warp collectives", what, mask);
}

void syncwarp(unsigned mask) {
    check_full_mask(mask, "__syncwarp");
    Fiber& f = me();
    const char* order = &tls_launch->warps[f.warp].order[f.parity];
    race::release(order);
    exchange(C_SYNCWARP, nullptr, 0);
    race::acquire(order);
}

uint32_t shfl(unsigned mask, uint32_t w, int arg, bool is_xor) {
    check_full_mask(mask, "a shuffle");
    uint32_t(*s)[8] = exchange(C_SHFL, &w, 1);
    const int src = is_xor ? (me().lane ^ arg) & 31 : arg & 31;
    return s[src][0];
}

int vote_any(unsigned mask, int pred) {
    check_full_mask(mask, "a vote");
    const uint32_t w = pred != 0;
    uint32_t(*s)[8] = exchange(C_VOTE, &w, 1);
    for (int l = 0; l < 32; ++l)
        if (s[l][0]) return 1;
    return 0;
}

static bool in_smem(const void* p, size_t bytes) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    const SharedBytes& s = tls_launch->smem;
    return !s.empty() && c >= s.data() && c + bytes <= s.data() + s.size();
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
    if (!in_smem(smem, 16) || reinterpret_cast<uintptr_t>(smem) % 16 != 0)
        fail("ldmatrix row address %p is not a 16-byte aligned row inside dynamic shared memory", smem);
    race::read(smem, 16);  // this lane's row, read as this lane
    uint32_t words[2];
    const uintptr_t a = reinterpret_cast<uintptr_t>(smem);
    words[0] = static_cast<uint32_t>(a);
    words[1] = static_cast<uint32_t>(a >> 32);
    uint32_t(*s)[8] = exchange(C_LDMATRIX, words, 2);
    const int lane = me().lane, g = lane / 4, t = lane % 4;
    if (lane == 0) tls_counters.ldmatrix_bytes += 4 * 8 * 16;  // four 8x8 matrices of b16
    for (int i = 0; i < 4; ++i) {
        // Matrix i's eight rows come from lanes 8i..8i+7; element (row, col) is a b16. Lane l gets
        // row l/4, elements 2(l%4), +1 (or, transposed, rows 2(l%4), +1 of column l/4): PTX ISA,
        // checked against CUTLASS's cute LDSM traits in tests/mma_fragments.rs.
        auto elem = [&](int row, int col) -> uint32_t {
            const uint32_t* w = s[8 * i + row];
            const uintptr_t addr = (static_cast<uintptr_t>(w[1]) << 32) | w[0];
            uint16_t v;
            std::memcpy(&v, reinterpret_cast<const void*>(addr + 2 * col), 2);
            return v;
        };
        r[i] = trans ? elem(2 * t, g) | (elem(2 * t + 1, g) << 16) : elem(g, 2 * t) | (elem(g, 2 * t + 1) << 16);
    }
}

void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type) {
    const uint32_t words[6] = {a[0], a[1], a[2], a[3], b0, b1};
    if (me().lane == 0) ++tls_counters.mma;
    uint32_t(*s)[8] = exchange(C_MMA, words, 6);
    auto val = [&](uint32_t reg, int half) {
        const uint16_t h = static_cast<uint16_t>(reg >> (16 * half));
        return static_cast<double>(type == MMA_F16 ? f16_bits_to_f32(h) : bf16_bits_to_f32(h));
    };
    // PTX ISA, mma.m16n8k16 fragments (tests/mma_fragments.rs checks these against CUTLASS's cute traits): A(r, k) in lane (r%8)*4 + (k%8)/2, register
    // (r >= 8) + 2(k >= 8), half k%2; B(k, n) in lane 4n + (k%8)/2, register (k >= 8), half k%2;
    // this lane's D elements are rows g, g+8 and columns 2t, 2t+1.
    auto A = [&](int r, int k) { return val(s[(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k % 2); };
    auto B = [&](int k, int n) { return val(s[4 * n + (k % 8) / 2][4 + (k >= 8)], k % 2); };
    const int lane = me().lane, g = lane / 4, t = lane % 4;
    for (int c = 0; c < 4; ++c) {
        const int row = g + 8 * (c / 2), col = 2 * t + (c % 2);
        double acc = 0.0;  // products of 16-bit values are exact; the sum is rounded once
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        d[c] = static_cast<float>(static_cast<double>(d[c]) + acc);
    }
}

void check_aligned(const void* p, size_t bytes) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail("misaligned %zu-byte vector access at %p", bytes, p);
}

void vector_access(const void* p, size_t bytes) {
    check_aligned(p, bytes);
    if (!in_smem(p, bytes)) tls_counters.global_bytes += bytes;
}

static void land(const std::vector<Copy>& group) {
    for (const Copy& c : group) {
        if (c.src) std::memcpy(c.dst, c.src, 16);
        else std::memset(c.dst, 0, 16);
    }
}

void cp_async_16(void* smem, const void* gmem, bool valid) {
    if (!in_smem(smem, 16) || reinterpret_cast<uintptr_t>(smem) % 16 != 0)
        fail("cp.async destination %p is not 16-byte aligned inside dynamic shared memory", smem);
    if (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0) fail("cp.async source %p is not 16-byte aligned", gmem);
    if (valid) tls_counters.global_bytes += 16;
    if (valid) race::read(gmem, 16);
    race::write(smem, 16);  // from the issue on, the bytes are the copy's ...
    me().open.push_back(Copy{smem, valid ? gmem : nullptr});
}

void cp_async_commit() {
    Fiber& f = me();
    f.groups.push_back(Group{std::move(f.open), false});
    f.open.clear();
    // Lands now or only at its wait (coin flip): a read that does not wait sees poison.
    if (next_random(*tls_launch) & 1) {
        land(f.groups.back().copies);
        f.groups.back().landed = true;
    }
}

void cp_async_wait(int newest_pending) {
    Fiber& f = me();
    while (static_cast<int>(f.groups.size()) > newest_pending) {
        Group& g = f.groups.front();
        if (!g.landed) land(g.copies);
        for (const Copy& c : g.copies) race::write(c.dst, 16);  // ... until the wait that retires them
        f.groups.erase(f.groups.begin());
    }
}

// ---- the block scheduler --------------------------------------------------------------------
// Warps advance one at a time, in random order: the chosen warp's runnable lanes run (random
// lane order) until each blocks; a warp whose lanes all wait at the same collective is released
// when it is next chosen. So warps drift apart by any number of collectives between two
// __syncthreads, as they may on a GPU, and a missing barrier shows. When no warp can move, the
// block barrier opens if every live thread waits at it (exited threads count as arrived).
enum WarpStatus { W_RUNNABLE, W_COLLECTIVE, W_BLOCKED };

static WarpStatus warp_status(Launch& L, unsigned w, unsigned n) {
    unsigned at_warp = 0, done = 0, at_block = 0, running = 0;
    Collective kind = C_NONE;
    const unsigned lo = w * 32, hi = (w + 1) * 32 < n ? (w + 1) * 32 : n;
    for (unsigned i = lo; i < hi; ++i) {
        const Fiber& f = L.fibers[i];
        if (f.state == WAIT_WARP) {
            if (at_warp > 0 && f.waiting != kind) {
                L.error = std::string("lanes of warp ") + std::to_string(w) + " wait at different collectives (" +
                          collective_name(kind) + ", " + collective_name(f.waiting) + ")";
                return W_BLOCKED;
            }
            kind = f.waiting;
            ++at_warp;
        }
        running += f.state == RUN;
        done += f.state == DONE;
        at_block += f.state == WAIT_BLOCK;
    }
    if (running > 0) return W_RUNNABLE;
    if (at_warp == 0) return W_BLOCKED;
    if (done > 0 || at_block > 0 || hi - lo < 32) {
        L.error = std::string(collective_name(kind)) + " in warp " + std::to_string(w) + " while " +
                  std::to_string(done + (32 - (hi - lo))) + " lanes have exited and " + std::to_string(at_block) +
                  " wait at __syncthreads: a full-warp collective needs every lane";
        return W_BLOCKED;
    }
    return W_COLLECTIVE;
}

static bool run_block(Launch& L, char* stacks, size_t stack_size, size_t stride) {
    const unsigned n = L.bdim.x * L.bdim.y * L.bdim.z, nwarps = (n + 31) / 32;
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = L.fibers[i];
        f.tid = uint3{i % L.bdim.x, (i / L.bdim.x) % L.bdim.y, i / (L.bdim.x * L.bdim.y)};
        f.lane = static_cast<int>(i % 32);
        f.warp = static_cast<int>(i / 32);
        f.parity = 0;
        f.barriers = 0;
        f.state = RUN;
        f.waiting = C_NONE;
        f.open.clear();
        f.groups.clear();
        context_init(f.ctx, stacks + i * stride + (stride - stack_size), stack_size);
    }
    race::acquire(&race::g_order);  // the fill comes after the last block's threads ...
    if (!L.smem.empty()) std::memset(L.smem.data(), 0xff, L.smem.size());  // uninitialised shared memory reads as NaN
    std::memset(L.static_arena.data(), 0xff, L.static_used);  // (the rest is still NaN)
    race::release(&race::g_order);  // ... and before this block's
#ifdef RA_EMU_RACECHECK
    for (unsigned i = 0; i < n; ++i) {
        char name[96];
        snprintf(name, sizeof name, "block (%u,%u,%u) thread %u", L.bid.x, L.bid.y, L.bid.z, i);
        race::name_fiber(L.fibers[i].race, name);
    }
#endif
    std::vector<std::pair<unsigned, WarpStatus>> movable;
    std::vector<unsigned> lanes;
    for (;;) {
        movable.clear();
        for (unsigned w = 0; w < nwarps; ++w) {
            const WarpStatus st = warp_status(L, w, n);
            if (!L.error.empty()) return false;
            if (st != W_BLOCKED) movable.emplace_back(w, st);
        }
        if (movable.empty()) {
            bool alive = false;
            for (unsigned i = 0; i < n; ++i)
                if (L.fibers[i].state == WAIT_BLOCK) {
                    L.fibers[i].state = RUN;
                    alive = true;
                }
            if (!alive) return true;  // every thread has exited
            continue;
        }
        const auto [w, status] = movable[next_random(L) % movable.size()];
        const unsigned lo = w * 32, hi = (w + 1) * 32 < n ? (w + 1) * 32 : n;
        lanes.clear();
        for (unsigned i = lo; i < hi; ++i) {
            // Lanes that reached a collective early wait for the rest; once all have, it completes.
            if (status == W_COLLECTIVE) L.fibers[i].state = RUN;
            if (L.fibers[i].state == RUN) lanes.push_back(i);
        }
        for (size_t i = lanes.size(); i > 1; --i) std::swap(lanes[i - 1], lanes[next_random(L) % i]);
        for (unsigned i : lanes) {
            tls_thread = &L.fibers[i];
            race::switch_to(L.fibers[i].race);
            context_switch(L.sched, L.fibers[i].ctx);
            if (!L.error.empty()) return false;
        }
    }
}

static thread_local std::string tls_error;

}  // namespace ra_emu

// Sizes a GPU of the supported generations takes per block (sm_86/89 allow 99 KiB of shared memory).
static const uint32_t MAX_SMEM = 99 * 1024;

// Run kernel `name` over the whole grid, one block at a time. 0 on success; otherwise
// ra_emu_last_error() says why (nothing is left running).
// `counters` ([trig, mma, global bytes, ldmatrix bytes]) accumulates the work the launch did.
extern "C" int ra_emu_launch(const char* name, const uint32_t grid[3], const uint32_t block[3], uint32_t smem_bytes,
                             const void* params, size_t params_size, uint64_t seed, uint64_t* counters) {
    using namespace ra_emu;
    tls_error.clear();
    tls_counters = Counters{0, 0, 0, 0};
    auto it = registry().find(name);
    if (it == registry().end()) {
        tls_error = std::string("no kernel named ") + name;
        return 1;
    }
    const KernelInfo& k = it->second;
    const unsigned threads = block[0] * block[1] * block[2];
    if (params_size != k.params_size) {
        tls_error = std::string(name) + ": parameter struct of " + std::to_string(params_size) + " bytes, the kernel takes " +
                    std::to_string(k.params_size);
        return 1;
    }
    if (threads == 0 || threads > static_cast<unsigned>(k.max_threads) || grid[0] == 0 || grid[1] == 0 || grid[2] == 0 ||
        grid[1] > 65535 || grid[2] > 65535) {
        tls_error = std::string(name) + ": invalid launch: " + std::to_string(threads) + " threads (bound " +
                    std::to_string(k.max_threads) + "), grid " + std::to_string(grid[0]) + "x" + std::to_string(grid[1]) + "x" +
                    std::to_string(grid[2]);
        return 1;
    }
    if (smem_bytes > MAX_SMEM) {
        tls_error = std::string(name) + ": " + std::to_string(smem_bytes) + " bytes of dynamic shared memory (sm_86/89 blocks get 99 KiB)";
        return 1;
    }
    Launch L;
    L.gdim = uint3{grid[0], grid[1], grid[2]};
    L.bdim = uint3{block[0], block[1], block[2]};
    L.fibers.resize(threads);
    L.warps.resize((threads + 31) / 32);
    L.static_smem.reserve(STATIC_SMEM_KEYS);
    L.static_arena.assign(STATIC_SMEM_BYTES, 0xff);
    if (!L.smem.allocate(smem_bytes)) {
        tls_error = "could not map shared memory";
        return 1;
    }
    L.entry = k.entry;
    L.params = params;
    // Fiber stacks with a guard page below each: an overflow faults instead of corrupting.
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE)), stack_size = 256 * 1024, stride = stack_size + page;
    char* stacks = static_cast<char*>(mmap(nullptr, stride * threads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (stacks == MAP_FAILED) {
        tls_error = "could not map fiber stacks";
        return 1;
    }
    for (unsigned i = 0; i < threads; ++i) mprotect(stacks + i * stride, page, PROT_NONE);
    const unsigned long reports_before = race::reports();
    L.sched_race = race::current_fiber();
    for (Fiber& f : L.fibers) f.race = race::create_fiber();
    Launch* prev_launch = tls_launch;
    BlockState* prev_block = tls_block;
    ThreadState* prev_thread = tls_thread;
    tls_launch = &L;
    tls_block = &L;
    bool ok = true;
    for (uint32_t z = 0; ok && z < grid[2]; ++z)
        for (uint32_t y = 0; ok && y < grid[1]; ++y)
            for (uint32_t x = 0; ok && x < grid[0]; ++x) {
                L.bid = uint3{x, y, z};
                L.rng = (seed ^ (0x9E3779B97F4A7C15ULL * (1 + x + 65536ULL * (y + 65536ULL * z)))) | 1;
                ok = run_block(L, stacks, stack_size, stride);
            }
    race::acquire(&race::g_order);  // the teardown and the caller come after every thread
    tls_launch = prev_launch;
    tls_block = prev_block;
    tls_thread = prev_thread;
    for (Fiber& f : L.fibers) race::destroy_fiber(f.race);
    munmap(stacks, stride * threads);
    counters[0] += tls_counters.trig;
    counters[1] += tls_counters.mma;
    counters[2] += tls_counters.global_bytes;
    counters[3] += tls_counters.ldmatrix_bytes;
    if (!ok) {
        tls_error = std::string(name) + ": " + L.error;
        return 1;
    }
    if (race::reports() != reports_before) {
        tls_error = std::string(name) + ": a data race (racecheck: ThreadSanitizer's report is on stderr)";
        return 1;
    }
    return 0;
}

extern "C" const char* ra_emu_last_error() { return ra_emu::tls_error.c_str(); }
