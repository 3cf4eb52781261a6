//! The static bounds of an expression, checked when it is compiled, and its instrumentation with the meter's
//! functions ([`super::meter`]).
//!
//! Compiling happens in four steps, each bounded by the one before:
//! 1. [`prescan`]: before the parser sees it, the source must be at most [`MAX_SOURCE_BYTES`] long and nest at most
//!    [`MAX_NESTING`] levels, estimated from its brackets and its operator chains (`1+1+…` and `a.b.c…` build
//!    one tree level per operator). The parser and the interpreter recurse once or more per level, so this is
//!    what keeps them from overflowing the stack; [`STACK_PER_LEVEL`] is how much stack a level may take.
//! 2. Parsing, then [`depth`]: the parsed tree, macros expanded, must be at most [`MAX_DEPTH`] deep.
//! 3. [`instrument`]: the meter's calls are put into the tree.
//! 4. [`estimate`]: a static cost estimate, counting the operations the meter will charge with the sizes known
//!    at compile time (list literals, `lists.range(<literal>)`; an unknown size counts as one element), must not
//!    exceed the default cost budget: `lists.range(1000000).map(x, lists.range(1000))` is rejected here.

use cel::common::ast::{CallExpr, ComprehensionExpr, EntryExpr, Expr as Ast, IdedExpr, LiteralValue, operators};

use super::meter::{ITEM_FN, JOIN_FN, LINEAR_FN, METER_FN, QUADRATIC_FN, RANGE_FN, REPLACE_FN, SPLIT_FN, TICK_FN};

/// The longest expression source accepted, in bytes.
pub const MAX_SOURCE_BYTES: usize = 16 * 1024;
/// The deepest nesting accepted, as estimated from the source before parsing.
pub const MAX_NESTING: usize = 64;
/// The deepest tree accepted after parsing (macros add a few levels each).
pub const MAX_DEPTH: usize = 2 * MAX_NESTING;
/// Stack one nesting level may take while parsing or evaluating (unoptimised builds take ten times more).
pub const STACK_PER_LEVEL: usize = if cfg!(debug_assertions) { 256 * 1024 } else { 32 * 1024 };

/// Functions that build nothing (a comparison, a boolean, a number, a borrowed part of an operand): not metered.
const UNMETERED: &[&str] = &[
    operators::EQUALS,
    operators::NOT_EQUALS,
    operators::LESS,
    operators::LESS_EQUALS,
    operators::GREATER,
    operators::GREATER_EQUALS,
    operators::LOGICAL_AND,
    operators::LOGICAL_OR,
    operators::LOGICAL_NOT,
    operators::CONDITIONAL,
    operators::NEGATE,
    operators::MODULO,
    operators::INDEX,
    operators::OPT_INDEX,
    operators::OPT_SELECT,
    operators::IN,
    operators::NOT_STRICTLY_FALSE,
    "size",
    "type",
    "int",
    "uint",
    "double",
    "bool",
    "dyn",
    "matches",
    "contains",
    "startsWith",
    "endsWith",
    "indexOf",
    "lastIndexOf",
];

// ---------------------------------------------------------------------------------------------------------------
// 1. Before parsing.

/// Check the size and the estimated nesting of a source before it is parsed; the error says what is too large.
pub fn prescan(source: &str) -> Result<(), String> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(format!("the expression is {} bytes long; at most {MAX_SOURCE_BYTES} are allowed", source.len()));
    }
    let nesting = estimated_nesting(source);
    if nesting > MAX_NESTING {
        return Err(format!(
            "the expression nests too deeply (an estimated {nesting} levels of brackets and chained operators; at \
             most {MAX_NESTING} are allowed): split it into several nodes or edges"
        ));
    }
    Ok(())
}

/// An upper bound of the tree depth the parser will build: every open bracket is a level, and within a bracket
/// every operator chained since the last `,` is one more (`a + b + c` is a tree two levels deep). `&&` and `||`
/// chains are parsed as balanced trees and not counted. String literals and comments are skipped the way CEL's
/// lexer skips them (raw strings have no escapes; a `'` in a comment opens nothing).
fn estimated_nesting(source: &str) -> usize {
    let bytes = source.as_bytes();
    // Operators chained in the current segment of each open bracket.
    let mut levels: Vec<usize> = vec![0];
    let mut deepest = 0;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let mut chained = false;
        match c {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'\'' | b'"' => {
                i = skip_string(bytes, i, false);
                continue;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let word = &source[start..i];
                let prefix = word.len() <= 2 && word.bytes().all(|b| matches!(b, b'r' | b'R' | b'b' | b'B'));
                if prefix && matches!(bytes.get(i), Some(b'\'' | b'"')) {
                    i = skip_string(bytes, i, word.bytes().any(|b| b == b'r' || b == b'R'));
                }
                continue;
            }
            b'(' | b'[' | b'{' => {
                if let Some(level) = levels.last_mut() {
                    *level += 1;
                }
                levels.push(0);
            }
            b')' | b']' | b'}' if levels.len() > 1 => {
                levels.pop();
            }
            b',' => {
                if let Some(level) = levels.last_mut() {
                    *level = 0;
                }
            }
            b'&' | b'|' => {}
            b'+' | b'-' | b'*' | b'/' | b'%' | b'.' | b'!' | b'?' | b'<' | b'>' => chained = true,
            b'=' if i > 0 && !matches!(bytes[i - 1], b'!' | b'<' | b'>' | b'=') => chained = true,
            _ => {}
        }
        if chained && let Some(level) = levels.last_mut() {
            *level += 1;
        }
        deepest = deepest.max(levels.iter().sum::<usize>() + levels.len() - 1);
        i += 1;
    }
    deepest
}

/// The index after the string literal starting at `start` (a quote; triple quotes too); the end of the source
/// when it is not terminated.
fn skip_string(bytes: &[u8], start: usize, raw: bool) -> usize {
    let quote = bytes[start];
    let triple = bytes.get(start + 1) == Some(&quote) && bytes.get(start + 2) == Some(&quote);
    let mut i = start + if triple { 3 } else { 1 };
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if !raw => i += 2,
            b'\n' | b'\r' if !triple => return i,
            q if q == quote => {
                if !triple {
                    return i + 1;
                }
                if bytes.get(i + 1) == Some(&quote) && bytes.get(i + 2) == Some(&quote) {
                    return i + 3;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    bytes.len()
}

// ---------------------------------------------------------------------------------------------------------------
// 2. After parsing.

/// The depth of a tree (a leaf is 1).
pub fn depth(e: &IdedExpr) -> usize {
    let mut deepest = 0;
    for_each_child(e, |child| deepest = deepest.max(depth(child)));
    deepest + 1
}

fn for_each_child(e: &IdedExpr, mut f: impl FnMut(&IdedExpr)) {
    match &e.expr {
        Ast::Call(call) => {
            if let Some(target) = &call.target {
                f(target);
            }
            call.args.iter().for_each(f);
        }
        Ast::Comprehension(c) => {
            for child in [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                f(child);
            }
        }
        Ast::List(list) => list.elements.iter().for_each(f),
        Ast::Map(map) => map.entries.iter().for_each(|entry| entry_children(&entry.expr, &mut f)),
        Ast::Struct(s) => s.entries.iter().for_each(|entry| entry_children(&entry.expr, &mut f)),
        Ast::Select(select) => f(&select.operand),
        Ast::Ident(_) | Ast::Literal(_) | Ast::Unspecified => {}
    }
}

fn entry_children(entry: &EntryExpr, f: &mut impl FnMut(&IdedExpr)) {
    match entry {
        EntryExpr::MapEntry(e) => {
            f(&e.key);
            f(&e.value);
        }
        EntryExpr::StructField(field) => f(&field.value),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Instrumentation.

/// Put the meter's calls into a parsed tree (see [`super::meter`]). `next_id` numbers the nodes added.
pub fn instrument(e: &mut IdedExpr, next_id: &mut u64) {
    match &mut e.expr {
        Ast::Call(call) => {
            if let Some(target) = &mut call.target {
                instrument(target, next_id);
            }
            call.args.iter_mut().for_each(|a| instrument(a, next_id));
            if guard_call(call, next_id) {
                wrap(e, METER_FN, next_id);
            }
        }
        Ast::Comprehension(c) => instrument_comprehension(c, next_id),
        Ast::List(list) => {
            list.elements.iter_mut().for_each(|a| instrument(a, next_id));
            if list.elements.iter().any(is_computed) {
                wrap(e, METER_FN, next_id);
            }
        }
        Ast::Map(map) => {
            let mut computed = false;
            for entry in &mut map.entries {
                if let EntryExpr::MapEntry(entry) = &mut entry.expr {
                    instrument(&mut entry.key, next_id);
                    instrument(&mut entry.value, next_id);
                    computed |= is_computed(&entry.key) || is_computed(&entry.value);
                }
            }
            if computed {
                wrap(e, METER_FN, next_id);
            }
        }
        Ast::Struct(s) => {
            for entry in &mut s.entries {
                if let EntryExpr::StructField(field) = &mut entry.expr {
                    instrument(&mut field.value, next_id);
                }
            }
            wrap(e, METER_FN, next_id);
        }
        Ast::Select(select) => instrument(&mut select.operand, next_id),
        Ast::Ident(_) | Ast::Literal(_) | Ast::Unspecified => {}
    }
}

/// Guard a call whose cost or output size depends on its arguments; whether its result must then be metered.
fn guard_call(call: &mut CallExpr, next_id: &mut u64) -> bool {
    let name = call.func_name.as_str();
    let member = call.target.is_some();
    match (name, member, call.args.len()) {
        ("replace", true, 2 | 3) | ("split", true, 1 | 2) | ("join", true, 0 | 1) => {
            // The guarded versions take the receiver first and charge before they build anything.
            call.func_name = match name {
                "replace" => REPLACE_FN,
                "split" => SPLIT_FN,
                _ => JOIN_FN,
            }
            .to_string();
            if let Some(target) = call.target.take() {
                call.args.insert(0, *target);
            }
            false
        }
        ("range", true, 1)
            if call.target.as_deref().is_some_and(|t| matches!(&t.expr, Ast::Ident(n) if n == "lists")) =>
        {
            if let Some(n) = call.args.first_mut() {
                wrap(n, RANGE_FN, next_id);
            }
            false
        }
        ("distinct", true, 0) | ("sort", true, 0) | ("@sortByAssociatedKeys", true, 1) => {
            if let Some(target) = call.target.as_deref_mut() {
                wrap(target, if name == "distinct" { QUADRATIC_FN } else { LINEAR_FN }, next_id);
            }
            true
        }
        (name, _, _) => !(UNMETERED.contains(&name) || name.starts_with("__flowcraft_")),
    }
}

/// `map` and `filter` loops keep cel's in-place append (`@result + [item]`, maybe behind `guard ?`): the item and
/// the guard are metered. Every other loop is metered through its loop condition, whose errors end the loop at
/// once (an `exists` step's errors do not).
fn instrument_comprehension(c: &mut ComprehensionExpr, next_id: &mut u64) {
    instrument(&mut c.iter_range, next_id);
    instrument(&mut c.accu_init, next_id);
    instrument(&mut c.result, next_id);
    if let Some((guard, item)) = append_step(c) {
        if let Some(guard) = guard {
            instrument(guard, next_id);
            wrap(guard, TICK_FN, next_id);
        }
        instrument(item, next_id);
        wrap(item, ITEM_FN, next_id);
        return;
    }
    instrument(&mut c.loop_step, next_id);
    instrument(&mut c.loop_cond, next_id);
    wrap(&mut c.loop_cond, TICK_FN, next_id);
}

/// The guard and the appended item of a loop step shaped as cel's in-place append expects it.
fn append_step(c: &mut ComprehensionExpr) -> Option<(Option<&mut IdedExpr>, &mut IdedExpr)> {
    let accu = c.accu_var.as_str();
    let is_accu = |e: &IdedExpr| matches!(&e.expr, Ast::Ident(n) if n == accu);
    if !is_accu(&c.result) || !matches!(c.loop_cond.expr, Ast::Literal(_)) {
        return None;
    }
    fn appended<'a>(e: &'a mut IdedExpr, is_accu: &dyn Fn(&IdedExpr) -> bool) -> Option<&'a mut IdedExpr> {
        let Ast::Call(call) = &mut e.expr else { return None };
        if call.func_name != operators::ADD || call.target.is_some() {
            return None;
        }
        match call.args.as_mut_slice() {
            [lhs, rhs] if is_accu(lhs) => match &mut rhs.expr {
                Ast::List(list) if list.elements.len() == 1 => list.elements.first_mut(),
                _ => None,
            },
            _ => None,
        }
    }
    let guarded = matches!(&c.loop_step.expr, Ast::Call(call)
        if call.func_name == operators::CONDITIONAL && call.target.is_none());
    if !guarded {
        return appended(&mut c.loop_step, &is_accu).map(|item| (None, item));
    }
    let Ast::Call(call) = &mut c.loop_step.expr else { return None };
    match call.args.as_mut_slice() {
        [guard, step, otherwise] if is_accu(otherwise) => appended(step, &is_accu).map(|item| (Some(guard), item)),
        _ => None,
    }
}

/// Whether a literal's element is computed (anything but a literal).
fn is_computed(e: &IdedExpr) -> bool {
    !matches!(e.expr, Ast::Literal(_))
}

/// Replace `e` with `function(e)`.
fn wrap(e: &mut IdedExpr, function: &str, next_id: &mut u64) {
    let inner = std::mem::take(e);
    *next_id += 1;
    *e = IdedExpr {
        id: *next_id,
        expr: Ast::Call(CallExpr { func_name: function.to_string(), target: None, args: vec![inner] }),
    };
}

// ---------------------------------------------------------------------------------------------------------------
// 4. The static cost estimate.

/// The operations the meter will charge for an instrumented tree, with the sizes known statically (an unknown
/// size counts as one element).
pub fn estimate(e: &IdedExpr) -> u64 {
    match &e.expr {
        Ast::Comprehension(c) => {
            let n = known_size(&c.iter_range).unwrap_or(1);
            let per_iteration = estimate(&c.loop_cond).saturating_add(estimate(&c.loop_step));
            estimate(&c.iter_range)
                .saturating_add(estimate(&c.accu_init))
                .saturating_add(n.saturating_mul(per_iteration))
                .saturating_add(estimate(&c.result))
        }
        Ast::Call(call) => {
            let mut total: u64 = 0;
            for_each_child(e, |child| total = total.saturating_add(estimate(child)));
            let arg = call.args.first();
            let own = match call.func_name.as_str() {
                METER_FN | TICK_FN | ITEM_FN | REPLACE_FN | SPLIT_FN | JOIN_FN => 1,
                RANGE_FN => arg.and_then(int_literal).unwrap_or(1),
                LINEAR_FN => arg.and_then(known_size).unwrap_or(1),
                QUADRATIC_FN => arg.and_then(known_size).map_or(1, |n| n.saturating_mul(n) / 64),
                _ => 0,
            };
            total.saturating_add(own)
        }
        _ => {
            let mut total: u64 = 0;
            for_each_child(e, |child| total = total.saturating_add(estimate(child)));
            total
        }
    }
}

/// The number of elements a value will have, when known statically.
fn known_size(e: &IdedExpr) -> Option<u64> {
    match &e.expr {
        Ast::List(list) => Some(list.elements.len() as u64),
        Ast::Map(map) => Some(map.entries.len() as u64),
        Ast::Call(call) if matches!(call.func_name.as_str(), METER_FN | LINEAR_FN | QUADRATIC_FN) => {
            call.args.first().and_then(known_size)
        }
        Ast::Call(call) if call.func_name == "range" => call.args.first().and_then(known_size_of_range),
        Ast::Comprehension(c) if matches!(c.accu_init.expr, Ast::List(_)) => known_size(&c.iter_range),
        _ => None,
    }
}

/// `n` of `__flowcraft_range__(n)` when `n` is a literal.
fn known_size_of_range(arg: &IdedExpr) -> Option<u64> {
    match &arg.expr {
        Ast::Call(call) if call.func_name == RANGE_FN => call.args.first().and_then(int_literal),
        _ => None,
    }
}

fn int_literal(e: &IdedExpr) -> Option<u64> {
    match &e.expr {
        Ast::Literal(LiteralValue::Int(i)) => u64::try_from(*i.inner()).ok(),
        Ast::Literal(LiteralValue::UInt(u)) => Some(*u.inner()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_estimated_from_brackets_and_chains() {
        assert_eq!(estimated_nesting("1"), 0);
        assert_eq!(estimated_nesting("1 + 1 + 1"), 2);
        assert_eq!(estimated_nesting("a.b.c"), 2);
        assert_eq!(estimated_nesting("((1))"), 4);
        assert_eq!(estimated_nesting("[1, 2, 3]"), 2);
        assert_eq!(estimated_nesting("f(a + b, c + d)"), 3);
        assert_eq!(estimated_nesting("a && b && c || d"), 0);
        assert_eq!(estimated_nesting("a == b"), 1);
        // brackets in strings and comments open nothing; a raw string has no escapes
        assert_eq!(estimated_nesting("'(((('"), 0);
        assert_eq!(estimated_nesting("'''((('''"), 0);
        assert_eq!(estimated_nesting(r"'\'(((('"), 0);
        assert_eq!(estimated_nesting(r"r'\' + ((1))"), 5);
        assert_eq!(estimated_nesting("1 // it's (((( \n + ((1))"), 5);
        assert_eq!(estimated_nesting("bar'x'"), 0);
        assert!(estimated_nesting(&vec!["1"; 100].join("+")) >= 99);
        assert!(estimated_nesting(&format!("{}1{}", "(".repeat(70), ")".repeat(70))) >= 70);
    }

    #[test]
    fn prescan_limits() {
        assert!(prescan("input.a + 1").is_ok());
        let long = format!("'{}'", "x".repeat(MAX_SOURCE_BYTES));
        assert!(prescan(&long).unwrap_err().contains("bytes long"));
        let deep = vec!["1"; MAX_NESTING + 2].join("+");
        assert!(prescan(&deep).unwrap_err().contains("nests too deeply"));
    }
}
