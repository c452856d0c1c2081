//! Price and stock filters, checked on each document a query matches.
//!
//! A range query on a fast field walks the column for every candidate range, which costs as
//! much as the catalog is large whatever the text matched. Checking the one or two column
//! values of each matching document instead costs as much as the text matched, which for a
//! query with words is far less. The filters wrap any collector.

use std::ops::Bound;

use tantivy::collector::{Collector, SegmentCollector};
use tantivy::fastfield::Column;
use tantivy::{DocId, Score, SegmentOrdinal, SegmentReader};

use crate::query::Comparison;
use crate::schema::{PRICE_FIELD, STOCK_FIELD};

/// The numeric filters of a query; a document passes when it has a value for every filtered
/// field and every comparison holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct NumericFilters {
    price: Vec<(Comparison, f64)>,
    stock: Vec<(Comparison, u64)>,
}

impl NumericFilters {
    /// Adds `price OP value`.
    pub fn price(&mut self, op: Comparison, value: f64) {
        self.price.push((op, value));
    }

    /// Adds `stock OP value`.
    pub fn stock(&mut self, op: Comparison, value: u64) {
        self.stock.push((op, value));
    }

    /// Whether there is nothing to check.
    pub fn is_empty(&self) -> bool {
        self.price.is_empty() && self.stock.is_empty()
    }

    /// `collector` keeping only the documents that pass.
    pub fn wrap<C: Collector>(&self, collector: C) -> FilteredCollector<C> {
        FilteredCollector {
            filters: self.clone(),
            inner: collector,
        }
    }
}

fn holds<T: PartialOrd>(value: T, (op, bound): &(Comparison, T)) -> bool {
    let (lower, upper) = op.bounds(bound);
    let above = match lower {
        Bound::Included(b) => value >= *b,
        Bound::Excluded(b) => value > *b,
        Bound::Unbounded => true,
    };
    let below = match upper {
        Bound::Included(b) => value <= *b,
        Bound::Excluded(b) => value < *b,
        Bound::Unbounded => true,
    };
    above && below
}

/// A collector that passes only documents meeting [`NumericFilters`] to its inner collector.
pub(crate) struct FilteredCollector<C> {
    filters: NumericFilters,
    inner: C,
}

/// The per-segment part of [`FilteredCollector`].
pub(crate) struct FilteredSegmentCollector<S> {
    filters: NumericFilters,
    /// The price column, when a price filter exists (`None` inside: no document has a price).
    price: Option<Option<Column<f64>>>,
    /// The stock column, likewise.
    stock: Option<Option<Column<u64>>>,
    inner: S,
}

impl<C: Collector> Collector for FilteredCollector<C> {
    type Fruit = C::Fruit;
    type Child = FilteredSegmentCollector<C::Child>;

    fn for_segment(
        &self,
        segment: SegmentOrdinal,
        reader: &SegmentReader,
    ) -> tantivy::Result<Self::Child> {
        let fast = reader.fast_fields();
        let price = if self.filters.price.is_empty() {
            None
        } else {
            Some(fast.column_opt::<f64>(PRICE_FIELD)?)
        };
        let stock = if self.filters.stock.is_empty() {
            None
        } else {
            Some(fast.column_opt::<u64>(STOCK_FIELD)?)
        };
        Ok(FilteredSegmentCollector {
            filters: self.filters.clone(),
            price,
            stock,
            inner: self.inner.for_segment(segment, reader)?,
        })
    }

    fn requires_scoring(&self) -> bool {
        self.inner.requires_scoring()
    }

    fn merge_fruits(
        &self,
        fruits: Vec<<Self::Child as SegmentCollector>::Fruit>,
    ) -> tantivy::Result<Self::Fruit> {
        self.inner.merge_fruits(fruits)
    }
}

impl<S: SegmentCollector> FilteredSegmentCollector<S> {
    fn passes(&self, doc: DocId) -> bool {
        let price_ok = match &self.price {
            None => true,
            Some(column) => column
                .as_ref()
                .and_then(|c| c.first(doc))
                .is_some_and(|v| self.filters.price.iter().all(|f| holds(v, f))),
        };
        let stock_ok = match &self.stock {
            None => true,
            Some(column) => column
                .as_ref()
                .and_then(|c| c.first(doc))
                .is_some_and(|v| self.filters.stock.iter().all(|f| holds(v, f))),
        };
        price_ok && stock_ok
    }
}

impl<S: SegmentCollector> SegmentCollector for FilteredSegmentCollector<S> {
    type Fruit = S::Fruit;

    fn collect(&mut self, doc: DocId, score: Score) {
        if self.passes(doc) {
            self.inner.collect(doc, score);
        }
    }

    fn harvest(self) -> Self::Fruit {
        self.inner.harvest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_hold_as_written() {
        let cases = [
            (Comparison::Less, 5.0, [true, false, false]),
            (Comparison::LessOrEqual, 5.0, [true, true, false]),
            (Comparison::Greater, 5.0, [false, false, true]),
            (Comparison::GreaterOrEqual, 5.0, [false, true, true]),
            (Comparison::Equal, 5.0, [false, true, false]),
        ];
        for (op, bound, expected) in cases {
            let got = [4.99, 5.0, 5.01].map(|v| holds(v, &(op, bound)));
            assert_eq!(got, expected, "{op:?}");
        }
    }
}
