//! `x @ W^T` for the few rows of a decoding step on the CPU, where reading the weights is the
//! whole cost: every weight row is read once and multiplied with all rows of `x` while it is in
//! the cache.
//!
//! The weights come either as dense f32 rows or as the GGUF file's own Q4_1 and Q8_0 blocks
//! ([`BlockRows`]), half a byte or a byte a value plus their blocks' scales: a step reads a
//! fifth to a third of the bytes, and the products are the dense copy's up to the order of
//! summation. The blocks are a faster way to read the f32 model, not another model. In either
//! form a row's result does not depend on the other rows it is computed with, so a sequence
//! decodes the same alone or in a batch.

use candle_core::{
    Device, Tensor,
    quantized::{GgmlDType, QTensor},
};
use half::f16;
use rayon::prelude::*;
use wide::f32x8;

use crate::error::{LlamaError, Result};

/// Rows up to which a CPU projection runs this kernel rather than candle's matrix product: a
/// decoding step has one row per sequence, and for a few rows the product is bound by reading
/// the weights, which the general product packs into a new layout first. Measured on the
/// embedded model (`benches/forward.rs`), the general product overtakes this kernel between
/// 16 and 32 rows.
pub(crate) const FEW_ROWS: usize = 16;

/// Weight rows per parallel task.
const WEIGHT_ROWS_PER_TASK: usize = 32;

/// Independent accumulator chains per row. A fused multiply-add takes about four cycles before
/// its result can feed the next one, so a single chain would leave the vector unit idle most of
/// the time; four keep it busy.
const CHAINS: usize = 4;

/// Eight floats, one vector's lanes.
type Chunk = [f32; 8];

/// `x` as groups of [`CHAINS`] eight-float chunks, the chunks left over, and the floats left
/// over.
#[inline(always)]
fn split(x: &[f32]) -> (&[[Chunk; CHAINS]], &[Chunk], &[f32]) {
    let (chunks, tail) = x.as_chunks::<8>();
    let (groups, rest) = chunks.as_chunks::<CHAINS>();
    (groups, rest, tail)
}

/// `acc[c] += x[c] · w[c]` for each chain, as fused multiply-adds on eight lanes.
#[inline(always)]
fn group_fma(acc: &mut [f32x8; CHAINS], x: &[Chunk; CHAINS], w: &[f32x8; CHAINS]) {
    for c in 0..CHAINS {
        acc[c] = f32x8::new(x[c]).mul_add(w[c], acc[c]);
    }
}

/// One row's dot product: its chains accumulated over the groups, then over the leftover
/// chunks (chunk `j` into chain `j`), merged pairwise, the lanes summed in order, and the
/// leftover floats added. Every caller runs exactly these operations for a row, so a row's
/// value does not depend on which rows it was computed with: a sequence decodes the same
/// alone or in a batch.
#[inline(always)]
fn finish(
    mut acc: [f32x8; CHAINS],
    (x_rest, x_tail): (&[Chunk], &[f32]),
    (w_rest, w_tail): (&[Chunk], &[f32]),
) -> f32 {
    for (chain, (xv, wv)) in acc.iter_mut().zip(x_rest.iter().zip(w_rest)) {
        *chain = f32x8::new(*xv).mul_add(f32x8::new(*wv), *chain);
    }
    let lanes = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    let tail: f32 = x_tail.iter().zip(w_tail).map(|(a, b)| a * b).sum();
    lanes.to_array().iter().sum::<f32>() + tail
}

/// The dot product of `x` and `w`, which have the same length.
#[inline]
pub(crate) fn dot(x: &[f32], w: &[f32]) -> f32 {
    let (wg, wr, wt) = split(w);
    let (xg, xr, xt) = split(x);
    let mut acc = [f32x8::ZERO; CHAINS];
    for (xv, wv) in xg.iter().zip(wg) {
        group_fma(&mut acc, xv, &wv.map(f32x8::new));
    }
    finish(acc, (xr, xt), (wr, wt))
}

/// The dot products of `x0` and `x1` with `w` (all the same length), each exactly as [`dot`]
/// computes it, sharing the loads of `w`.
#[inline]
fn dot2(x0: &[f32], x1: &[f32], w: &[f32]) -> [f32; 2] {
    let (wg, wr, wt) = split(w);
    let ((g0, r0, t0), (g1, r1, t1)) = (split(x0), split(x1));
    let (mut a0, mut a1) = ([f32x8::ZERO; CHAINS], [f32x8::ZERO; CHAINS]);
    for ((v0, v1), wv) in g0.iter().zip(g1).zip(wg) {
        let wv = wv.map(f32x8::new);
        group_fma(&mut a0, v0, &wv);
        group_fma(&mut a1, v1, &wv);
    }
    [
        finish(a0, (r0, t0), (wr, wt)),
        finish(a1, (r1, t1), (wr, wt)),
    ]
}

/// Input rows a weight row is multiplied with at once, where reading and converting the weight
/// row once for all of them pays: the block kernel converts each value to a float once for
/// [`WIDEST`] rows. Products come in runs of this many rows, then two, then one.
const WIDEST: usize = 4;

/// One product `x @ W^T` in progress: the rows of `x` and where `W` comes from.
trait RowProducts: Sync {
    /// Output features (rows of `W`).
    fn rows(&self) -> usize;

    /// Row `o` of `W` times rows `i..i + N` of `x` (`N` is 1, 2 or [`WIDEST`]), each row
    /// exactly as it is computed alone, sharing the reads of the weight row.
    fn products<const N: usize>(&self, o: usize, i: usize) -> [f32; N];
}

/// `(m, n)` row-major, parallel over blocks of weight rows.
fn product(m: usize, weight: &impl RowProducts) -> Vec<f32> {
    let n = weight.rows();
    // Computed transposed, `(n, m)`, so each task writes one contiguous block.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(m * WEIGHT_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, block)| {
            for (j, out) in block.chunks_mut(m).enumerate() {
                let o = task * WEIGHT_ROWS_PER_TASK + j;
                let (runs, rest) = out.as_chunks_mut::<WIDEST>();
                for (r, run) in runs.iter_mut().enumerate() {
                    *run = weight.products::<WIDEST>(o, WIDEST * r);
                }
                let start = WIDEST * runs.len();
                let (pairs, last) = rest.as_chunks_mut::<2>();
                for (p, pair) in pairs.iter_mut().enumerate() {
                    *pair = weight.products::<2>(o, start + 2 * p);
                }
                if let [y] = last {
                    *y = weight.products::<1>(o, m - 1)[0];
                }
            }
        });
    let mut y = vec![0f32; m * n];
    for (o, column) in yt.chunks(m).enumerate() {
        for (i, &value) in column.iter().enumerate() {
            y[i * n + o] = value;
        }
    }
    y
}

/// A dense row-major f32 weight times rows of `x`.
struct DenseProduct<'a> {
    weight: &'a [f32],
    x: &'a [f32],
    rows: usize,
    cols: usize,
}

impl DenseProduct<'_> {
    fn x(&self, i: usize) -> &[f32] {
        &self.x[i * self.cols..][..self.cols]
    }

    fn w(&self, o: usize) -> &[f32] {
        &self.weight[o * self.cols..][..self.cols]
    }
}

impl RowProducts for DenseProduct<'_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn products<const N: usize>(&self, o: usize, i: usize) -> [f32; N] {
        // Four rows' chains would not fit the vector registers, so a dense run is taken in
        // pairs; each row's operations are the same either way.
        let w = self.w(o);
        let mut out = [0f32; N];
        let (pairs, last) = out.as_chunks_mut::<2>();
        for (p, pair) in pairs.iter_mut().enumerate() {
            *pair = dot2(self.x(i + 2 * p), self.x(i + 2 * p + 1), w);
        }
        if let [y] = last {
            *y = dot(self.x(i + N - 1), w);
        }
        out
    }
}

/// `x @ W^T` for a few rows of `x` `(m, k)` and a dense f32 weight `W` `(n, k)`, both on the
/// CPU, read from where they lie.
pub(crate) struct FewRowsTimesWeight;

impl candle_core::CustomOp2 for FewRowsTimesWeight {
    fn name(&self) -> &'static str {
        "few-rows-times-weight"
    }

    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 || !xl.is_contiguous() || !wl.is_contiguous() {
            candle_core::bail!(
                "few-rows-times-weight: {:?} by {:?}",
                xl.shape(),
                wl.shape()
            );
        }
        let weight = DenseProduct {
            weight: &ws.as_slice::<f32>()?[wl.start_offset()..][..n * k],
            x: &xs.as_slice::<f32>()?[xl.start_offset()..][..m * k],
            rows: n,
            cols: k,
        };
        Ok((
            candle_core::CpuStorage::F32(product(m, &weight)),
            (m, n).into(),
        ))
    }
}

/// Values per GGUF block of the encodings [`BlockRows`] reads.
const BLOCK: usize = 32;

/// The quantized values of a [`BlockRows`], one item per block of [`BLOCK`] values.
#[derive(Debug)]
enum BlockValues {
    /// Q4_1's values, 0..16, packed as in the file.
    Q4_1(Vec<Nibbles>),
    /// Q8_0's signed values.
    Q8_0(Vec<[i8; BLOCK]>),
}

/// One block's values in a [`BlockRows`] encoding, which the kernel converts to floats eight
/// at a time.
trait BlockCodes: Copy + Sync {
    /// Values `8 · chunk` to `8 · chunk + 8` of the block as floats (`chunk` < 4).
    fn lanes(&self, chunk: usize) -> f32x8;
}

/// Q4_1's 16 bytes of a block, as GGML packs them: the low nibbles are values 0..16 and the
/// high nibbles values 16..32. A decoding step reads its weights once per step and is bound by
/// memory, so keeping the nibbles packed (half the bytes of one byte a value) is worth the two
/// instructions that unpack each chunk.
#[derive(Debug, Clone, Copy)]
struct Nibbles([u8; BLOCK / 2]);

impl BlockCodes for Nibbles {
    #[inline(always)]
    fn lanes(&self, chunk: usize) -> f32x8 {
        let bytes = &self.0[(chunk % 2) * 8..][..8];
        let shift = (chunk / 2) * 4;
        let mut lanes = [0f32; 8];
        for (lane, &byte) in lanes.iter_mut().zip(bytes) {
            *lane = f32::from((byte >> shift) & 0x0F);
        }
        f32x8::new(lanes)
    }
}

impl BlockCodes for [i8; BLOCK] {
    #[inline(always)]
    fn lanes(&self, chunk: usize) -> f32x8 {
        let mut lanes = [0f32; 8];
        for (lane, &value) in lanes.iter_mut().zip(&self[chunk * 8..][..8]) {
            *lane = f32::from(value);
        }
        f32x8::new(lanes)
    }
}

/// A weight matrix in the GGUF file's own Q4_1 or Q8_0 blocks, which a decoding step reads
/// instead of the dense f32 copy: half a byte (Q4_1) or a byte (Q8_0) and a share of the
/// block's scale per value instead of four.
///
/// A block `b` of a row holds `value · scale_b + offset_b` (no offset in Q8_0), so its part of
/// a dot product with `x` is `scale_b · Σ value·x + offset_b · Σ x`: the values are converted
/// to floats and multiplied with `x` directly, and the sums of `x` per block are computed once
/// per input row. The products equal the dense copy's up to the order of summation, like the
/// matrix product of a prefill.
#[derive(Debug)]
pub(crate) struct BlockRows {
    values: BlockValues,
    /// One per block, row-major.
    scales: Vec<f32>,
    /// One per block, row-major (Q4_1 only; empty for Q8_0).
    offsets: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl BlockRows {
    /// The blocks of `stored` when its encoding is one this kernel reads and its rows are
    /// whole blocks; `None` otherwise (the dense copy then serves every step).
    pub(crate) fn of(stored: &QTensor) -> Result<Option<Self>> {
        let bytes_per_block = match stored.dtype() {
            GgmlDType::Q4_1 => 20,
            GgmlDType::Q8_0 => 34,
            _ => return Ok(None),
        };
        let (rows, cols) = stored.shape().dims2()?;
        if !cols.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let data = stored.data()?;
        let count = rows * cols / BLOCK;
        if data.len() != count * bytes_per_block {
            return Err(LlamaError::InvalidInput(format!(
                "a {rows}x{cols} {:?} tensor holds {} bytes, not {}",
                stored.dtype(),
                data.len(),
                count * bytes_per_block
            )));
        }
        let half_at = |bytes: &[u8], at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let blocks = data.chunks_exact(bytes_per_block);
        let scales = blocks.clone().map(|b| half_at(b, 0).to_f32()).collect();
        let (values, offsets) = if stored.dtype() == GgmlDType::Q4_1 {
            // GGML's Q4_1: f16 scale, f16 minimum, then 16 bytes whose low nibbles are values
            // 0..16 of the block and high nibbles values 16..32.
            let offsets = blocks.clone().map(|b| half_at(b, 2).to_f32()).collect();
            let values = blocks
                .map(|block| Nibbles(std::array::from_fn(|j| block[4 + j])))
                .collect();
            (BlockValues::Q4_1(values), offsets)
        } else {
            // GGML's Q8_0: f16 scale, then 32 signed bytes.
            let values = blocks
                .map(|block| std::array::from_fn(|j| block[2 + j].cast_signed()))
                .collect();
            (BlockValues::Q8_0(values), Vec::new())
        };
        Ok(Some(Self {
            values,
            scales,
            offsets,
            rows,
            cols,
        }))
    }

    /// The matrices of `parts` stacked row after row, when they share their width and encoding.
    pub(crate) fn joined(parts: Vec<Self>) -> Option<Self> {
        let first = parts.first()?;
        let cols = first.cols;
        let mut values = match &first.values {
            BlockValues::Q4_1(_) => BlockValues::Q4_1(Vec::new()),
            BlockValues::Q8_0(_) => BlockValues::Q8_0(Vec::new()),
        };
        let (mut scales, mut offsets, mut rows) = (Vec::new(), Vec::new(), 0);
        for part in parts {
            if part.cols != cols {
                return None;
            }
            match (&mut values, part.values) {
                (BlockValues::Q4_1(all), BlockValues::Q4_1(these)) => all.extend(these),
                (BlockValues::Q8_0(all), BlockValues::Q8_0(these)) => all.extend(these),
                _ => return None,
            }
            scales.extend(part.scales);
            offsets.extend(part.offsets);
            rows += part.rows;
        }
        Some(Self {
            values,
            scales,
            offsets,
            rows,
            cols,
        })
    }

    /// `x` `(m, k)` times the matrix's transpose, on the CPU.
    pub(crate) fn few_rows_times(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            return Err(LlamaError::InvalidInput(format!(
                "a {m}x{k} input times a {}x{} weight",
                self.rows, self.cols
            )));
        }
        let x = x.flatten_all()?.to_vec1::<f32>()?;
        // Σ x over each block of each input row, for the offsets.
        let block_sums = if self.offsets.is_empty() {
            Vec::new()
        } else {
            x.as_chunks::<BLOCK>()
                .0
                .iter()
                .map(|block| block.iter().sum::<f32>())
                .collect()
        };
        let y = match &self.values {
            BlockValues::Q4_1(values) => product(m, &self.with(values, &x, &block_sums)),
            BlockValues::Q8_0(values) => product(m, &self.with(values, &x, &block_sums)),
        };
        Ok(Tensor::from_vec(y, (m, self.rows), &Device::Cpu)?)
    }

    fn with<'a, V>(
        &'a self,
        values: &'a [V],
        x: &'a [f32],
        block_sums: &'a [f32],
    ) -> BlockProduct<'a, V> {
        BlockProduct {
            rows: self,
            values,
            x,
            block_sums,
        }
    }
}

/// A [`BlockRows`] matrix times rows of `x`.
struct BlockProduct<'a, V> {
    rows: &'a BlockRows,
    values: &'a [V],
    x: &'a [f32],
    block_sums: &'a [f32],
}

impl<V: BlockCodes> BlockProduct<'_, V> {
    fn blocks_per_row(&self) -> usize {
        self.rows.cols / BLOCK
    }

    fn x(&self, i: usize) -> &[f32] {
        &self.x[i * self.rows.cols..][..self.rows.cols]
    }

    /// `offset_b · Σ x` over the blocks of row `o` and input row `i`.
    fn offset_term(&self, o: usize, i: usize) -> f32 {
        if self.rows.offsets.is_empty() {
            return 0.0;
        }
        let nb = self.blocks_per_row();
        dot(
            &self.rows.offsets[o * nb..][..nb],
            &self.block_sums[i * nb..][..nb],
        )
    }

    fn row(&self, o: usize) -> (&[V], &[f32]) {
        let nb = self.blocks_per_row();
        (
            &self.values[o * nb..][..nb],
            &self.rows.scales[o * nb..][..nb],
        )
    }
}

impl<V: BlockCodes> RowProducts for BlockProduct<'_, V> {
    fn rows(&self) -> usize {
        self.rows.rows
    }

    fn products<const N: usize>(&self, o: usize, i: usize) -> [f32; N] {
        let (values, scales) = self.row(o);
        let sums: [f32; N] =
            scaled_blocks_dots(values, scales, std::array::from_fn(|r| self.x(i + r)));
        std::array::from_fn(|r| sums[r] + self.offset_term(o, i + r))
    }
}

/// `Σ_b scale_b · Σ_j value_bj · x_bj` over whole blocks, for each of `N` input rows: per
/// block and row one chain of four multiply-adds on eight lanes, then one multiply-add by the
/// block's scale into the row's running sum, whose lanes are summed in order at the end. The
/// values are converted to floats once for all rows, and a row's operations do not depend on
/// `N`.
#[inline(never)]
fn scaled_blocks_dots<V: BlockCodes, const N: usize>(
    vb: &[V],
    scales: &[f32],
    xs: [&[f32]; N],
) -> [f32; N] {
    let xb = xs.map(|x| x.as_chunks::<8>().0.as_chunks::<4>().0);
    // The shortest length bounds every index below, so the loop runs without bounds checks.
    let blocks = xb
        .iter()
        .fold(vb.len().min(scales.len()), |n, x| n.min(x.len()));
    let mut acc = [f32x8::ZERO; N];
    for b in 0..blocks {
        let (v, scale) = (&vb[b], scales[b]);
        let mut block = [f32x8::ZERO; N];
        // One chunk at a time: converting the block's four chunks first measured slower (a
        // one-row step 7.4 to 8.7 ms against 7.2 to 7.8), likely as their vectors and the
        // rows' running sums no longer fit the registers together.
        #[expect(
            clippy::needless_range_loop,
            reason = "the chunk index picks both the block's values and each row's inputs"
        )]
        for c in 0..BLOCK / 8 {
            let lanes = v.lanes(c);
            for r in 0..N {
                block[r] = lanes.mul_add(f32x8::new(xb[r][b][c]), block[r]);
            }
        }
        let scale = f32x8::splat(scale);
        for r in 0..N {
            acc[r] = block[r].mul_add(scale, acc[r]);
        }
    }
    acc.map(|a| a.to_array().iter().sum())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// A weight matrix in `dtype`, its dense dequantization, and seven input rows (a run of
    /// four, a pair and a single row in the kernel).
    fn fixture(dtype: GgmlDType, rows: usize, cols: usize) -> (QTensor, Tensor, Tensor) {
        let dense = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).unwrap();
        let stored = QTensor::quantize(&dense, dtype).unwrap();
        let dequantized = stored.dequantize(&Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (7, cols), &Device::Cpu).unwrap();
        (stored, dequantized, x)
    }

    #[test]
    fn block_rows_give_the_dense_copys_products() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (stored, dense, x) = fixture(dtype, 70, 96);
            let blocks = BlockRows::of(&stored).unwrap().unwrap();
            let from_blocks = blocks.few_rows_times(&x).unwrap().to_vec2::<f32>().unwrap();
            let from_dense = x
                .apply_op2_no_bwd(&dense, &FewRowsTimesWeight)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            // Both are the product of the same values, up to the order of summation.
            let reference = x.matmul(&dense.t().unwrap()).unwrap();
            let reference = reference.to_vec2::<f32>().unwrap();
            let pairs = from_blocks
                .iter()
                .flatten()
                .zip(from_dense.iter().flatten());
            for ((a, b), r) in pairs.zip(reference.iter().flatten()) {
                assert!((a - r).abs() < 2e-5, "{dtype:?}: blocks {a} against {r}");
                assert!((b - r).abs() < 2e-5, "{dtype:?}: dense {b} against {r}");
            }
        }
    }

    #[test]
    fn a_row_is_the_same_alone_or_among_others() {
        let (stored, _, x) = fixture(GgmlDType::Q4_1, 40, 64);
        let blocks = BlockRows::of(&stored).unwrap().unwrap();
        let all = blocks.few_rows_times(&x).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in all.iter().enumerate() {
            let alone = blocks
                .few_rows_times(&x.narrow(0, i, 1).unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(&alone[0], row);
        }
    }

    #[test]
    fn other_encodings_and_ragged_rows_keep_the_dense_path() {
        let (stored, _, _) = fixture(GgmlDType::Q4_0, 8, 64);
        assert!(BlockRows::of(&stored).unwrap().is_none());
        let dense = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu).unwrap();
        let stored = QTensor::quantize(&dense, GgmlDType::F32).unwrap();
        assert!(BlockRows::of(&stored).unwrap().is_none());
    }

    #[test]
    fn paired_and_single_dot_products_agree_at_every_length() {
        // Lengths with whole groups, leftover chunks and leftover floats, alone and together.
        for len in [0, 3, 8, 24, 32, 43, 64, 100, 576] {
            let values = |seed: f32| -> Vec<f32> {
                (0..len).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
            };
            let (x0, x1, w) = (values(1.0), values(2.0), values(3.0));
            let pair = dot2(&x0, &x1, &w);
            assert_eq!(pair, [dot(&x0, &w), dot(&x1, &w)], "length {len}");
            let exact: f64 = x0.iter().zip(&w).map(|(a, b)| f64::from(a * b)).sum();
            assert!((f64::from(pair[0]) - exact).abs() < 1e-4, "length {len}");
        }
    }

    #[test]
    fn joined_blocks_are_the_parts_outputs_side_by_side() {
        let (a, _, x) = fixture(GgmlDType::Q4_1, 40, 64);
        let (b, _, _) = fixture(GgmlDType::Q4_1, 24, 64);
        let parts = [&a, &b].map(|t| BlockRows::of(t).unwrap().unwrap());
        let alone: Vec<Vec<Vec<f32>>> = parts
            .iter()
            .map(|p| p.few_rows_times(&x).unwrap().to_vec2::<f32>().unwrap())
            .collect();
        let joined = BlockRows::joined(parts.into()).unwrap();
        let together = joined.few_rows_times(&x).unwrap().to_vec2::<f32>().unwrap();
        for (row, (first, second)) in together.iter().zip(alone[0].iter().zip(&alone[1])) {
            assert_eq!(row[..40], first[..]);
            assert_eq!(row[40..], second[..]);
        }
        // Parts of different encodings or widths stay apart.
        let (c, _, _) = fixture(GgmlDType::Q8_0, 8, 64);
        let (d, _, _) = fixture(GgmlDType::Q4_1, 8, 96);
        for other in [c, d] {
            let parts = vec![
                BlockRows::of(&a).unwrap().unwrap(),
                BlockRows::of(&other).unwrap().unwrap(),
            ];
            assert!(BlockRows::joined(parts).is_none());
        }
    }

    #[test]
    fn a_mismatched_input_is_an_error() {
        let (stored, _, _) = fixture(GgmlDType::Q8_0, 8, 64);
        let blocks = BlockRows::of(&stored).unwrap().unwrap();
        let x = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(blocks.few_rows_times(&x).is_err());
    }
}
