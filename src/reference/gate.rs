//! The output gate (crate::output_gate) in f64: O · sigmoid(g).

use crate::error::Result;
use crate::output_gate::OutputGate;

/// `out` (`[rows, heads, head_dim]`, dense) times `sigmoid(gate)` elementwise, the gates read
/// as `layout` says. Errors if `gate` is too short.
pub fn output_gate(out: &mut [f64], gate: &[f64], layout: &OutputGate, heads: usize, head_dim: usize) -> Result<()> {
    let rows = out.len().checked_div(heads * head_dim).unwrap_or(0);
    layout.check(gate.len(), rows, heads, head_dim)?;
    for (e, o) in out.iter_mut().enumerate().take(rows * heads * head_dim) {
        let (t, h, c) = (e / (heads * head_dim), e / head_dim % heads, e % head_dim);
        *o /= 1.0 + (-gate[layout.index(t, h, c)]).exp();
    }
    Ok(())
}
