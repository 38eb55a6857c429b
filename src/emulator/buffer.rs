//! Host buffers for emulated kernels whose ends touch an inaccessible page: the emulator's
//! memcheck. A kernel that reads or writes past the end of one (by more than the < 16 bytes of
//! alignment slack) faults at once, and the fault handler prints how far past which buffer
//! before the process dies — instead of silently reading a neighbour's memory, as an
//! out-of-bounds access into an ordinary `Vec` would.

use std::ffi::c_void;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

extern "C" {
    fn ra_emu_guarded_alloc(bytes: usize) -> *mut c_void;
    fn ra_emu_guarded_free(data: *mut c_void);
}

/// A fixed-length buffer of `T` whose last element is followed by an inaccessible page
/// (16-byte aligned, as the kernels' vector and `cp.async` accesses need). Derefs to a slice,
/// so the [`Emulator`](super::Emulator) calls take it like any other buffer.
pub struct GuardedBuf<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: GuardedBuf owns its mapping exclusively, like a Box<[T]>.
unsafe impl<T: Copy + Send> Send for GuardedBuf<T> {}
// SAFETY: shared access only hands out &[T].
unsafe impl<T: Copy + Sync> Sync for GuardedBuf<T> {}

impl<T: Copy> GuardedBuf<T> {
    /// A guarded copy of `data`.
    ///
    /// # Panics
    /// If the memory cannot be mapped (or 8192 guarded buffers are alive at once).
    pub fn from_slice(data: &[T]) -> Self {
        let bytes = std::mem::size_of_val(data);
        if bytes == 0 {
            return GuardedBuf { ptr: NonNull::dangling(), len: data.len() };
        }
        // SAFETY: plain FFI call; the result is null or `bytes` writable bytes, 16-byte aligned.
        let raw = unsafe { ra_emu_guarded_alloc(bytes) } as *mut T;
        let ptr = NonNull::new(raw).expect("could not map a guarded buffer");
        assert!(std::mem::align_of::<T>() <= 16);
        // SAFETY: the mapping holds `bytes` = data.len() elements and does not overlap `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
        GuardedBuf { ptr, len: data.len() }
    }

    /// `len` elements, all `value`.
    pub fn filled(len: usize, value: T) -> Self {
        Self::from_slice(&vec![value; len])
    }
}

impl<T: Copy> Deref for GuardedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised elements live at `ptr` for as long as self (dangling only when empty).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> DerefMut for GuardedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Drop for GuardedBuf<T> {
    fn drop(&mut self) {
        if std::mem::size_of::<T>() * self.len > 0 {
            // SAFETY: the pointer came from ra_emu_guarded_alloc and is freed once.
            unsafe { ra_emu_guarded_free(self.ptr.as_ptr() as *mut c_void) };
        }
    }
}

impl<T: Copy + std::fmt::Debug> std::fmt::Debug for GuardedBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}
