//! Example binary that writes the seeded retail data set (catalog, stores, stock, questions).
//!
//! `cargo run --release -p searchloop-examples --example gen-retail -- --out DIR [--seed 42]
//! [--products 2400] [--heldout-fraction 0.25] [--alternate]`

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use searchloop_demo::retail::{GeneratorConfig, QuestionKind, Split, Vocabulary, generate};

/// Generate the retail data set: the same seed always writes byte-identical files.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory to write into; created if missing.
    #[arg(long)]
    out: PathBuf,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Number of products in the catalog.
    #[arg(long, default_value_t = 2400)]
    products: usize,
    /// Share of each question kind held out for evaluation.
    #[arg(long, default_value_t = 0.25)]
    heldout_fraction: f64,
    /// Draw product names and cities from the alternate vocabulary (none of the standard
    /// catalog's), for generalization checks.
    #[arg(long)]
    alternate: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.heldout_fraction) {
        bail!(
            "--heldout-fraction must be between 0 and 1, got {}",
            args.heldout_fraction
        );
    }
    let dataset = generate(&GeneratorConfig {
        seed: args.seed,
        products: args.products,
        heldout_fraction: args.heldout_fraction,
        vocabulary: if args.alternate {
            Vocabulary::Alternate
        } else {
            Vocabulary::Retail
        },
    });
    // `generate` keeps only verified questions; checking again guards the files as written.
    dataset
        .verify()
        .context("the generated data set failed verification")?;
    let files = dataset.write_to(&args.out)?;
    println!(
        "{} products, {} stores, {} stock rows, {} questions (seed {})",
        dataset.products.len(),
        dataset.stores.len(),
        dataset.stock.len(),
        dataset.questions.len(),
        args.seed
    );
    for kind in QuestionKind::ALL {
        let count = |split: Split| {
            dataset
                .questions
                .iter()
                .filter(|q| q.kind == kind && q.split == split)
                .count()
        };
        println!(
            "  {:<10} train {:>4}  heldout {:>4}",
            kind.as_str(),
            count(Split::Train),
            count(Split::Heldout)
        );
    }
    for path in [
        &files.catalog_jsonl,
        &files.catalog_csv,
        &files.stores,
        &files.stock,
        &files.questions,
    ] {
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_generator() -> Result<(), clap::Error> {
        let args = Args::try_parse_from(["gen-retail", "--out", "data"])?;
        let defaults = GeneratorConfig::default();
        assert_eq!(args.seed, defaults.seed);
        assert_eq!(args.products, defaults.products);
        assert_eq!(args.heldout_fraction, defaults.heldout_fraction);
        assert!(Args::try_parse_from(["gen-retail"]).is_err());
        Ok(())
    }
}
