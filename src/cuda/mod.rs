//! CUDA launch layer (filled in below).
