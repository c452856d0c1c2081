//! Named placeholders in declared SQL: `:sku` rewritten to `?1` for SQLite and `$1` for
//! PostgreSQL, so one declared query serves both databases and every value is bound, never
//! pasted into the text.
//!
//! The scanner skips string literals, quoted identifiers, comments, dollar-quoted bodies and
//! `::` casts, so only real placeholders are rewritten. It rejects positional placeholders (`?`,
//! `$1`), which would bypass the parameter declarations, and more than one statement.

/// A declared query's SQL, with placeholders numbered by the parameter's declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PositionalSql {
    /// The text for SQLite (`?1`, `?2`, ...).
    pub(crate) sqlite: String,
    /// The text for PostgreSQL (`$1`, `$2`, ...).
    pub(crate) postgres: String,
}

fn is_ident_start(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_'
}

fn is_ident(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

/// The index just past the quote that closes the one opening at `start`. A doubled quote is an
/// escaped quote; with `backslash`, so is `\'` (PostgreSQL `E'...'` strings).
fn skip_quoted(bytes: &[u8], start: usize, backslash: bool) -> Result<usize, String> {
    let quote = bytes[start];
    let mut i = start + 1;
    while i < bytes.len() {
        if backslash && bytes[i] == b'\\' {
            i += 2;
        } else if bytes[i] == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return Ok(i + 1);
            }
        } else {
            i += 1;
        }
    }
    Err(format!("unclosed {} quote", char::from(quote)))
}

/// The end of the dollar-quote tag at `start` (`$$` or `$tag$`), if one starts there.
fn dollar_tag_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < bytes.len() && is_ident(bytes[i]) {
        i += 1;
    }
    let tag_is_valid = i == start + 1 || is_ident_start(bytes[start + 1]);
    (bytes.get(i) == Some(&b'$') && tag_is_valid).then_some(i + 1)
}

/// Rewrites `sql`'s `:name` placeholders; every name must be in `params` and every parameter
/// used. The error says what is wrong, for the config message.
pub(crate) fn rewrite(sql: &str, params: &[&str]) -> Result<PositionalSql, String> {
    let bytes = sql.as_bytes();
    let mut sqlite = String::with_capacity(sql.len());
    let mut postgres = String::with_capacity(sql.len());
    let mut used = vec![false; params.len()];
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let next = bytes.get(i + 1).copied();
        let after_ident = i > 0 && is_ident(bytes[i - 1]);
        match bytes[i] {
            b'\'' => {
                let escape_string = after_ident
                    && matches!(bytes[i - 1], b'E' | b'e')
                    && !(i > 1 && is_ident(bytes[i - 2]));
                i = skip_quoted(bytes, i, escape_string)?;
            }
            b'"' | b'`' => i = skip_quoted(bytes, i, false)?,
            b'-' if next == Some(b'-') => {
                i = sql[i..].find('\n').map_or(bytes.len(), |end| i + end);
            }
            b'/' if next == Some(b'*') => {
                let end = sql[i + 2..]
                    .find("*/")
                    .ok_or_else(|| "unclosed /* comment".to_string())?;
                i += 2 + end + 2;
            }
            b'$' if next.is_some_and(|b| b.is_ascii_digit()) => {
                return Err("write :name placeholders, not $1".into());
            }
            b'$' if !after_ident => match dollar_tag_end(bytes, i) {
                Some(tag_end) => {
                    let tag = &sql[i..tag_end];
                    let close = sql[tag_end..]
                        .find(tag)
                        .ok_or_else(|| format!("unclosed {tag} quote"))?;
                    i = tag_end + close + tag.len();
                }
                None => i += 1,
            },
            b'?' => return Err("write :name placeholders, not '?'".into()),
            b';' => {
                if !sql[i + 1..].trim().is_empty() {
                    return Err("only one statement is allowed".into());
                }
                i += 1;
            }
            b':' if next == Some(b':') => i += 2,
            b':' if next.is_some_and(is_ident_start) => {
                let start = i + 1;
                let mut end = start;
                while end < bytes.len() && is_ident(bytes[end]) {
                    end += 1;
                }
                let name = &sql[start..end];
                let index = params
                    .iter()
                    .position(|p| *p == name)
                    .ok_or_else(|| format!("uses :{name}, which is not a declared parameter"))?;
                used[index] = true;
                sqlite.push_str(&sql[copied..i]);
                postgres.push_str(&sql[copied..i]);
                sqlite.push_str(&format!("?{}", index + 1));
                postgres.push_str(&format!("${}", index + 1));
                copied = end;
                i = end;
            }
            _ => i += 1,
        }
    }
    sqlite.push_str(&sql[copied..]);
    postgres.push_str(&sql[copied..]);
    if let Some(unused) = params.iter().zip(&used).find(|(_, used)| !**used) {
        return Err(format!(
            "parameter '{}' is declared but the SQL never uses :{}",
            unused.0, unused.0
        ));
    }
    Ok(PositionalSql { sqlite, postgres })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_by_declaration_order() {
        let sql = "SELECT a::text FROM t WHERE b = :b AND (:a IS NULL OR c = :a) -- :ignored\n";
        let out = rewrite(sql, &["a", "b"]).unwrap();
        assert_eq!(
            out.sqlite,
            "SELECT a::text FROM t WHERE b = ?2 AND (?1 IS NULL OR c = ?1) -- :ignored\n"
        );
        assert_eq!(
            out.postgres,
            "SELECT a::text FROM t WHERE b = $2 AND ($1 IS NULL OR c = $1) -- :ignored\n"
        );
    }

    #[test]
    fn literals_comments_and_quotes_are_skipped() {
        let sql = "SELECT ':x', \"col:y\", E'it\\'s :z', $q$ :w $q$, $$ :v $$ /* :u */ FROM t \
                   WHERE a = :a;";
        let out = rewrite(sql, &["a"]).unwrap();
        assert!(out.postgres.ends_with("WHERE a = $1;"), "{}", out.postgres);
        assert!(out.postgres.contains("':x'") && out.postgres.contains("/* :u */"));
    }

    #[test]
    fn mismatches_and_positional_placeholders_are_rejected() {
        let cases = [
            ("SELECT :a", &[][..], "not a declared parameter"),
            ("SELECT 1", &["a"][..], "never uses :a"),
            ("SELECT ?", &[][..], "not '?'"),
            ("SELECT $1", &[][..], "not $1"),
            ("SELECT 1; DELETE FROM t", &[][..], "one statement"),
            ("SELECT 'x", &[][..], "unclosed"),
            ("SELECT 1 /* x", &[][..], "unclosed"),
        ];
        for (sql, params, expected) in cases {
            let err = rewrite(sql, params).unwrap_err();
            assert!(err.contains(expected), "{sql}: {err}");
        }
    }
}
