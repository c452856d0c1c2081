//! Training curves from metrics files, drawn to SVG or PNG: reward, importance ratios (split by
//! the sign of the advantage), the SAPO-active and clipped fractions, KL, entropy, gradient
//! norm and the sampler/trainer log-prob gap. Several files (successive rounds) are drawn on
//! one step axis, in the order given.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use plotters::{coord::Shift, prelude::*};
use serde_json::Value;

use crate::error::{DemoError, Result};

/// Points of every curve, by curve name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Curves {
    series: BTreeMap<&'static str, Vec<(f64, f64)>>,
    steps: usize,
}

/// Curves read from a step line: (curve name, JSON pointer).
const STEP_FIELDS: [(&str, &str); 19] = [
    ("reward mean", "/reward_mean"),
    ("reward std", "/reward_std"),
    ("ratio mean", "/loss/ratio_mean"),
    ("ratio min", "/loss/ratio_min"),
    ("r<t, A>=0", "/loss/ratio_below_t_pos"),
    ("r<t, A<0", "/loss/ratio_below_t_neg"),
    ("r<0.5, A>=0", "/loss/ratio_below_half_pos"),
    ("r<0.5, A<0", "/loss/ratio_below_half_neg"),
    ("r<0.1, A>=0", "/loss/ratio_below_tenth_pos"),
    ("r<0.1, A<0", "/loss/ratio_below_tenth_neg"),
    ("SAPO active", "/loss/sapo_active_frac"),
    ("clipped", "/loss/clip_frac"),
    ("KL k1 (old||new)", "/loss/approx_kl_k1"),
    ("KL k3 (old||new)", "/loss/approx_kl_k3"),
    ("KL k3 to base", "/loss/kl_ref_k3"),
    ("entropy", "/loss/entropy_mean"),
    ("grad norm", "/grad_norm"),
    ("L_sapo", "/loss/sapo_loss"),
    ("response length", "/response_len_mean"),
];

/// Curves read from a round line, placed at the round's last step.
const ROUND_FIELDS: [(&str, &str); 2] = [
    ("gap mean", "/logprob_gap"),
    ("gap max", "/logprob_gap_max"),
];

/// The panels: title and the curves drawn in it.
const PANELS: [(&str, &[&str]); 9] = [
    ("reward", &["reward mean", "reward std"]),
    ("importance ratio", &["ratio mean", "ratio min"]),
    (
        "ratio tails by sign of A",
        &[
            "r<t, A>=0",
            "r<t, A<0",
            "r<0.5, A>=0",
            "r<0.5, A<0",
            "r<0.1, A>=0",
            "r<0.1, A<0",
        ],
    ),
    ("SAPO-active fraction", &["SAPO active"]),
    ("clip fraction", &["clipped"]),
    (
        "KL",
        &["KL k1 (old||new)", "KL k3 (old||new)", "KL k3 to base"],
    ),
    ("entropy (nats)", &["entropy"]),
    ("gradient norm (before clipping)", &["grad norm"]),
    ("sampler/trainer |log-prob gap|", &["gap mean", "gap max"]),
];

impl Curves {
    /// Reads metrics files in order; steps are numbered across files.
    pub fn read(paths: &[PathBuf]) -> Result<Self> {
        let mut curves = Curves::default();
        for path in paths {
            curves.add_file(path)?;
        }
        if curves.steps == 0 {
            return Err(DemoError::BadFile {
                path: paths.first().cloned().unwrap_or_default(),
                reason: "no step lines: is this a round's metrics.jsonl?".into(),
            });
        }
        Ok(curves)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|source| DemoError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let value: Value = serde_json::from_str(line).map_err(|e| DemoError::BadFile {
                path: path.to_path_buf(),
                reason: format!("line {}: {e}", i + 1),
            })?;
            let (fields, x): (&[(&str, &str)], f64) =
                match value.get("type").and_then(Value::as_str) {
                    Some("step") => {
                        self.steps += 1;
                        (&STEP_FIELDS, self.steps as f64)
                    }
                    Some("round") => (&ROUND_FIELDS, self.steps as f64),
                    _ => {
                        return Err(DemoError::BadFile {
                            path: path.to_path_buf(),
                            reason: format!("line {}: no \"type\" of step or round", i + 1),
                        });
                    }
                };
            for (name, pointer) in fields {
                // Missing and null values (NaN when written) leave a gap in the curve.
                if let Some(y) = value.pointer(pointer).and_then(Value::as_f64)
                    && y.is_finite()
                {
                    self.series.entry(name).or_default().push((x, y));
                }
            }
        }
        Ok(())
    }

    /// The points of curve `name`.
    pub fn points(&self, name: &str) -> &[(f64, f64)] {
        self.series.get(name).map_or(&[], Vec::as_slice)
    }

    /// Optimizer steps read.
    pub fn steps(&self) -> usize {
        self.steps
    }
}

/// Draws the curves of `metrics` files into `out`, an `.svg` or `.png` file.
pub fn plot_metrics(metrics: &[PathBuf], out: &Path) -> Result<Curves> {
    let curves = Curves::read(metrics)?;
    let panels: Vec<Panel> = PANELS
        .iter()
        .map(|(title, names)| Panel {
            title: (*title).to_string(),
            x_label: "step".to_string(),
            series: names
                .iter()
                .map(|name| Series {
                    label: (*name).to_string(),
                    points: curves.points(name).to_vec(),
                    band: Vec::new(),
                })
                .collect(),
        })
        .collect();
    draw_panels(&panels, (3, 3), curves.steps.max(2) as f64, out)?;
    Ok(curves)
}

/// One labelled curve of a panel.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// The legend's name for it.
    pub label: String,
    /// Its points, in x order; none draws nothing.
    pub points: Vec<(f64, f64)>,
    /// A shaded band around the curve, `(x, low, high)` in x order (the spread over seeds,
    /// say); empty draws none.
    pub band: Vec<(f64, f64, f64)>,
}

/// One chart: a title, the x axis's name, and its curves.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// The caption.
    pub title: String,
    /// The x axis's name.
    pub x_label: String,
    /// The curves, each in its own colour.
    pub series: Vec<Series>,
}

/// Draws `panels` on a `(rows, columns)` grid into `out` (`.svg` or `.png`), every x axis
/// running from 1 (or the earliest point's x, when lower) to `x_max`: the comparison plots of benchmarks (one curve per run, one point
/// per round) use it as the metrics plot does.
pub fn draw_panels(panels: &[Panel], grid: (usize, usize), x_max: f64, out: &Path) -> Result<()> {
    embedded_font().map_err(|reason| DemoError::Plot {
        path: out.to_path_buf(),
        reason,
    })?;
    let size = (500 * grid.1.max(1) as u32, 400 * grid.0.max(1) as u32);
    match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => draw(
            &SVGBackend::new(out, size).into_drawing_area(),
            panels,
            grid,
            x_max,
        ),
        Some("png") => draw(
            &BitMapBackend::new(out, size).into_drawing_area(),
            panels,
            grid,
            x_max,
        ),
        _ => Err("the output file must end in .svg or .png".to_string()),
    }
    .map_err(|reason| DemoError::Plot {
        path: out.to_path_buf(),
        reason,
    })
}

/// Registers DejaVu Sans, carried in the binary, as the plots' `sans-serif`: text is drawn by
/// plotters' pure-Rust glyph renderer, so no binary that plots needs the system's fontconfig
/// or freetype.
fn embedded_font() -> std::result::Result<(), String> {
    static REGISTERED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans font does not load".to_string())
        })
        .clone()
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Panel],
    grid: (usize, usize),
    x_max: f64,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let areas = root.split_evenly(grid);
    for (area, p) in areas.iter().zip(panels) {
        panel(area, p, x_max.max(2.0)).map_err(|e| format!("panel '{}': {e}", p.title))?;
    }
    root.present().map_err(|e| e.to_string())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Panel,
    x_max: f64,
) -> Result<(), String> {
    // The axis starts at 1 (the first step or round) unless a curve has an earlier point (a
    // round 0, the model before training).
    let x_min = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::min);
    let (lo, hi) = y_range(p.series.iter().flat_map(|s| {
        s.points
            .iter()
            .map(|p| p.1)
            .chain(s.band.iter().flat_map(|b| [b.1, b.2]))
    }));
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(56)
        .build_cartesian_2d(x_min..x_max, lo..hi)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(p.x_label.as_str())
        .max_light_lines(2)
        .draw()
        .map_err(|e| e.to_string())?;
    for (k, series) in p.series.iter().enumerate() {
        if series.points.is_empty() {
            continue;
        }
        let color = Palette99::pick(k).to_rgba();
        if !series.band.is_empty() {
            let outline: Vec<(f64, f64)> = series
                .band
                .iter()
                .map(|&(x, _, high)| (x, high))
                .chain(series.band.iter().rev().map(|&(x, low, _)| (x, low)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(
                    outline,
                    color.mix(0.2).filled(),
                )))
                .map_err(|e| e.to_string())?;
        }
        chart
            .draw_series(LineSeries::new(
                series.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(series.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        // Single points (one step, one round) are invisible as lines.
        chart
            .draw_series(
                series
                    .points
                    .iter()
                    .map(|&p| Circle::new(p, 2, color.filled())),
            )
            .map_err(|e| e.to_string())?;
    }
    if p.series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A padded range holding every value, or `0..1` when there are none.
fn y_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08)
        .max(1e-3 * lo.abs().max(hi.abs()))
        .max(1e-9);
    (lo - pad, hi + pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUND_ONE: &str = r#"{"type":"step","round":0,"step":1,"epoch":0,"learning_rate":1e-5,"grad_norm":0.5,"sequences":8,"loss":{"ratio_mean":1.0,"ratio_min":0.9,"ratio_below_t_pos":0.0,"sapo_active_frac":0.0,"clip_frac":0.0,"approx_kl_k1":0.0,"kl_ref_k3":null,"entropy_mean":2.5},"reward_mean":0.25,"reward_std":0.4}
{"type":"step","round":0,"step":2,"epoch":0,"learning_rate":1e-5,"grad_norm":0.7,"sequences":8,"loss":{"ratio_mean":0.97,"ratio_min":0.6,"ratio_below_t_pos":0.1,"sapo_active_frac":0.05,"clip_frac":0.02,"approx_kl_k1":0.01,"kl_ref_k3":null,"entropy_mean":2.4},"reward_mean":0.25,"reward_std":0.4}
{"type":"round","round":0,"logprob_gap":0.001,"logprob_gap_max":0.02}
"#;

    #[test]
    fn files_join_on_one_step_axis_and_nulls_leave_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.jsonl");
        std::fs::write(&a, ROUND_ONE).unwrap();
        std::fs::write(&b, ROUND_ONE.replace("0.25", "0.5")).unwrap();
        let curves = Curves::read(&[a, b]).unwrap();
        assert_eq!(curves.steps(), 4);
        assert_eq!(
            curves.points("reward mean"),
            [(1.0, 0.25), (2.0, 0.25), (3.0, 0.5), (4.0, 0.5)]
        );
        assert_eq!(curves.points("gap max"), [(2.0, 0.02), (4.0, 0.02)]);
        assert!(curves.points("KL k3 to base").is_empty());
        assert_eq!(curves.points("ratio min")[1], (2.0, 0.6));
    }

    #[test]
    fn svg_and_png_are_drawn_and_bad_inputs_refused() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        std::fs::write(&metrics, ROUND_ONE).unwrap();
        let svg = dir.path().join("curves.svg");
        plot_metrics(std::slice::from_ref(&metrics), &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("SAPO-active fraction"));
        // Legends name the curves that have points.
        assert!(text.contains("r&lt;t, A&gt;=0"), "{text}");
        assert!(!text.contains("r&lt;0.1, A&gt;=0"));
        let png = dir.path().join("curves.png");
        plot_metrics(std::slice::from_ref(&metrics), &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");

        let err = plot_metrics(std::slice::from_ref(&metrics), &dir.path().join("x.gif"));
        assert!(err.unwrap_err().to_string().contains(".svg or .png"));
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"type\":\"step\"}\nnot json\n").unwrap();
        assert!(
            Curves::read(&[bad])
                .unwrap_err()
                .to_string()
                .contains("line 2")
        );
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "").unwrap();
        assert!(Curves::read(&[empty]).is_err());
    }

    #[test]
    fn comparison_panels_draw_one_labelled_curve_per_run() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("compare.svg");
        let series = |label: &str, y: f64| Series {
            label: label.to_string(),
            points: vec![(1.0, y), (2.0, y + 0.1)],
            band: vec![(1.0, y - 0.05, y + 0.05), (2.0, y + 0.05, y + 0.15)],
        };
        let panels = [Panel {
            title: "held-out EM".into(),
            x_label: "round".into(),
            series: vec![series("grpo", 0.2), series("sapo", 0.3)],
        }];
        draw_panels(&panels, (1, 1), 2.0, &out).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains("held-out EM") && text.contains("grpo") && text.contains("sapo"));
        assert!(draw_panels(&panels, (1, 1), 2.0, &dir.path().join("x.jpg")).is_err());
    }
}
