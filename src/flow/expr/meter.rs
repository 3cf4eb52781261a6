//! The runtime meter of one evaluation and the functions that charge it.
//!
//! Compilation ([`super::bounds::instrument`]) puts calls of the functions below into every expression: a tick at
//! every comprehension iteration, a meter after every call that may build a value and around list and map
//! literals that hold computed values, and guards before the calls whose output can be much larger than their
//! input. Each charges the thread's [`Meter`]:
//!
//! - **cost**: 1 per comprehension iteration, metered call or literal, plus what a guard computes (`lists.range(n)`
//!   costs `n`, `distinct` `n²/64`, `sort` `n`);
//! - **memory**: the size of every value built (strings and bytes by their length, lists and maps by their
//!   entries, 16 bytes per value, counted deeply), charged *before* it is built where the size is known from the
//!   arguments (`lists.range`, `replace`, `split`, `join`, `+` on strings, bytes and lists);
//! - **time** and **cancellation**: checked every [`CLOCK_EVERY`] charges and on every large charge.
//!
//! The first limit hit makes every later charge fail too, so an error that CEL would otherwise absorb (`x || true`,
//! an `exists` step) cannot hide it; [`metered`] reports it and the evaluation fails with it whatever its value.

use std::cell::RefCell;
use std::collections::hash_map;
use std::time::{Duration, Instant};

use cel::common::types::{
    CelBytes, CelInt, CelList, CelMap, CelMapKey, CelOptional, CelString, DYN_TYPE, INT_TYPE, LIST_TYPE, STRING_TYPE,
};
use cel::common::value::{CowVal, Val};
use cel::{Env, ExecutionError};
use tokio_util::sync::CancellationToken;

use super::EvalLimits;
use crate::text::format_bytes;

/// Charges between two looks at the clock and the cancellation token.
const CLOCK_EVERY: u32 = 64;
/// A charge of at least this many bytes looks at the clock at once.
const LARGE_CHARGE: u64 = 64 * 1024;
/// The memory counted for every value (its box and header), on top of its contents.
const VALUE_BYTES: u64 = 16;
/// The memory counted for every list element and map entry, on top of its value.
const ENTRY_BYTES: u64 = 8;

/// A limit an evaluation exceeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Exceeded {
    /// More operations than the cost budget.
    Cost(u64),
    /// More bytes of values built than the memory budget.
    Memory(u64),
    /// Longer than the time limit.
    Time(Duration),
    /// The caller cancelled it (the node timed out).
    Cancelled,
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exceeded::Cost(limit) => write!(f, "exceeded its cost budget of {limit} operations"),
            Exceeded::Memory(limit) => {
                write!(f, "built more than its memory budget of {} of values", format_bytes(*limit))
            }
            Exceeded::Time(limit) => write!(f, "ran longer than its time limit of {} ms", limit.as_millis()),
            Exceeded::Cancelled => f.write_str("was cancelled (the node timed out)"),
        }
    }
}

struct Meter {
    cost_left: u64,
    memory_left: u64,
    started: Instant,
    limits: EvalLimits,
    exceeded: Option<Exceeded>,
    until_clock: u32,
}

impl Meter {
    fn charge(&mut self, cost: u64, memory: u64) -> Result<(), Exceeded> {
        if let Some(e) = &self.exceeded {
            return Err(e.clone());
        }
        let result = self.account(cost, memory);
        if let Err(e) = &result {
            self.exceeded = Some(e.clone());
        }
        result
    }

    fn account(&mut self, cost: u64, memory: u64) -> Result<(), Exceeded> {
        self.cost_left = self.cost_left.checked_sub(cost).ok_or(Exceeded::Cost(self.limits.cost))?;
        self.memory_left = self.memory_left.checked_sub(memory).ok_or(Exceeded::Memory(self.limits.memory))?;
        self.until_clock = self.until_clock.saturating_sub(1);
        if self.until_clock == 0 || memory >= LARGE_CHARGE {
            self.until_clock = CLOCK_EVERY;
            if self.limits.cancel.as_ref().is_some_and(CancellationToken::is_cancelled) {
                return Err(Exceeded::Cancelled);
            }
            if self.started.elapsed() > self.limits.time {
                return Err(Exceeded::Time(self.limits.time));
            }
        }
        Ok(())
    }
}

thread_local! {
    static METER: RefCell<Option<Meter>> = const { RefCell::new(None) };
}

/// Run `evaluate` under a fresh meter with `limits` on this thread; also returns the limit it exceeded, if any.
pub(super) fn metered<R>(limits: &EvalLimits, evaluate: impl FnOnce() -> R) -> (R, Option<Exceeded>) {
    /// Puts the meter that was installed before back, even if `evaluate` unwinds.
    struct Restore(Option<Meter>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            METER.with_borrow_mut(|m| *m = outer);
        }
    }
    let meter = Meter {
        cost_left: limits.cost,
        memory_left: limits.memory,
        started: Instant::now(),
        limits: limits.clone(),
        exceeded: None,
        until_clock: 1,
    };
    let _restore = Restore(METER.with_borrow_mut(|m| m.replace(meter)));
    let result = evaluate();
    let exceeded = METER.with_borrow_mut(|m| m.as_mut().and_then(|m| m.exceeded.take()));
    (result, exceeded)
}

/// Charge the thread's meter (nothing happens outside [`metered`]).
pub(super) fn charge(cost: u64, memory: u64) -> Result<(), ExecutionError> {
    METER
        .with_borrow_mut(|m| m.as_mut().map_or(Ok(()), |m| m.charge(cost, memory)))
        .map_err(|e| ExecutionError::function_error("limits", e.to_string()))
}

/// The memory still available to the current evaluation (unbounded outside [`metered`]).
fn memory_left() -> u64 {
    METER.with_borrow(|m| m.as_ref().map_or(u64::MAX, |m| m.memory_left))
}

/// Charge the memory of a value about to be kept: its deep size.
fn charge_value(value: &dyn Val) -> Result<(), ExecutionError> {
    let cap = memory_left().saturating_add(1);
    charge(1, weight(value, cap))
}

// ---------------------------------------------------------------------------------------------------------------
// Sizes.

enum Frame<'b, 'v> {
    List(std::slice::Iter<'b, Box<dyn Val + 'v>>),
    Map(hash_map::Iter<'b, CelMapKey<'v>, Box<dyn Val + 'v>>),
}

/// The deep size of a value in bytes (see the module documentation), counted up to a little past `cap`. The walk
/// keeps one frame per nesting level, not one entry per element.
pub(super) fn weight(value: &dyn Val, cap: u64) -> u64 {
    let mut total = 0u64;
    let mut frames: Vec<Frame<'_, '_>> = Vec::new();
    let mut next: Option<&dyn Val> = Some(value);
    loop {
        if let Some(v) = next.take() {
            total = total.saturating_add(VALUE_BYTES);
            if let Some(s) = v.downcast_ref::<CelString>() {
                total = total.saturating_add(s.inner().len() as u64);
            } else if let Some(b) = v.downcast_ref::<CelBytes>() {
                total = total.saturating_add(b.inner().len() as u64);
            } else if let Some(list) = v.downcast_ref::<CelList>() {
                frames.push(Frame::List(list.inner().iter()));
            } else if let Some(map) = v.downcast_ref::<CelMap>() {
                frames.push(Frame::Map(map.inner().iter()));
            } else if let Some(optional) = v.downcast_ref::<CelOptional>() {
                next = optional.inner();
                continue;
            } else if let Some(sizer) = v.as_sizer() {
                // Another collection type: at least its entries.
                let n = u64::try_from(*sizer.size().inner()).unwrap_or(0);
                total = total.saturating_add(n.saturating_mul(VALUE_BYTES + ENTRY_BYTES));
            }
        }
        if total > cap {
            return total;
        }
        let Some(frame) = frames.last_mut() else { return total };
        match frame {
            Frame::List(items) => match items.next() {
                Some(item) => {
                    total = total.saturating_add(ENTRY_BYTES);
                    next = Some(item.as_ref());
                }
                None => {
                    frames.pop();
                }
            },
            Frame::Map(entries) => match entries.next() {
                Some((key, value)) => {
                    let key_len = match key {
                        CelMapKey::String(s) => s.len() as u64,
                        _ => 8,
                    };
                    total = total.saturating_add(ENTRY_BYTES + VALUE_BYTES + key_len);
                    next = Some(value.as_ref());
                }
                None => {
                    frames.pop();
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The functions compilation calls.

/// `__flowcraft_meter__(v)`: after a call or a literal; a value built here costs its size, a borrowed one 1.
pub(super) const METER_FN: &str = "__flowcraft_meter__";
/// `__flowcraft_tick__(b)`: one comprehension iteration (around its loop condition or its filter).
pub(super) const TICK_FN: &str = "__flowcraft_tick__";
/// `__flowcraft_item__(v)`: an element a `map` or `filter` appends to its result.
pub(super) const ITEM_FN: &str = "__flowcraft_item__";
/// `__flowcraft_range__(n)`: the argument of `lists.range`, charged before the list is built.
pub(super) const RANGE_FN: &str = "__flowcraft_range__";
/// `__flowcraft_linear__(list)`: the receiver of `sort`, charged by its size.
pub(super) const LINEAR_FN: &str = "__flowcraft_linear__";
/// `__flowcraft_quadratic__(list)`: the receiver of `distinct`, charged by its size squared.
pub(super) const QUADRATIC_FN: &str = "__flowcraft_quadratic__";
/// The guarded `replace`, `split` and `join`, called with the receiver as first argument.
pub(super) const REPLACE_FN: &str = "__flowcraft_replace__";
/// See [`REPLACE_FN`].
pub(super) const SPLIT_FN: &str = "__flowcraft_split__";
/// See [`REPLACE_FN`].
pub(super) const JOIN_FN: &str = "__flowcraft_join__";

/// Declare the metering functions on the environment.
pub(super) fn register(env: &mut Env) -> Result<(), cel::DeclarationError> {
    env.add_overload(METER_FN, METER_FN, vec![DYN_TYPE], meter)?;
    env.add_overload(TICK_FN, TICK_FN, vec![DYN_TYPE], tick)?;
    env.add_overload(ITEM_FN, ITEM_FN, vec![DYN_TYPE], item)?;
    env.add_overload(RANGE_FN, RANGE_FN, vec![DYN_TYPE], range)?;
    env.add_overload(LINEAR_FN, LINEAR_FN, vec![DYN_TYPE], linear)?;
    env.add_overload(QUADRATIC_FN, QUADRATIC_FN, vec![DYN_TYPE], quadratic)?;
    env.add_overload(REPLACE_FN, "replace3", vec![STRING_TYPE, STRING_TYPE, STRING_TYPE], replace)?;
    env.add_overload(REPLACE_FN, "replace4", vec![STRING_TYPE, STRING_TYPE, STRING_TYPE, INT_TYPE], replace)?;
    env.add_overload(SPLIT_FN, "split2", vec![STRING_TYPE, STRING_TYPE], split)?;
    env.add_overload(SPLIT_FN, "split3", vec![STRING_TYPE, STRING_TYPE, INT_TYPE], split)?;
    env.add_overload(JOIN_FN, "join1", vec![LIST_TYPE], join)?;
    env.add_overload(JOIN_FN, "join2", vec![LIST_TYPE, STRING_TYPE], join)?;
    Ok(())
}

type Args<'b, 'v> = Vec<CowVal<'b, 'v>>;
type Out<'b, 'v> = Result<CowVal<'b, 'v>, ExecutionError>;

fn only<'b, 'v>(args: Args<'b, 'v>) -> Out<'b, 'v> {
    let count = args.len();
    let mut args = args.into_iter();
    match (args.next(), args.next()) {
        (Some(v), None) => Ok(v),
        _ => Err(ExecutionError::invalid_argument_count(1, count)),
    }
}

fn meter<'b, 'v>(args: Args<'b, 'v>) -> Out<'b, 'v> {
    let value = only(args)?;
    match &value {
        CowVal::Borrowed(_) => charge(1, 0)?,
        CowVal::Owned(v) => charge_value(v.as_ref())?,
    }
    Ok(value)
}

fn tick<'b, 'v>(args: Args<'b, 'v>) -> Out<'b, 'v> {
    charge(1, 0)?;
    only(args)
}

fn item<'b, 'v>(args: Args<'b, 'v>) -> Out<'b, 'v> {
    let value = only(args)?;
    charge_value(value.as_ref())?;
    Ok(value)
}

fn size_of(value: &dyn Val) -> u64 {
    value.as_sizer().map_or(0, |s| u64::try_from(*s.size().inner()).unwrap_or(0))
}

fn range<'b, 'v>(args: Args<'b, 'v>) -> Out<'b, 'v> {
    let n = only(args)?;
    if let Some(n) = n.downcast_ref::<CelInt>().map(|n| u64::try_from(*n.inner()).unwrap_or(0)) {
        charge(n, n.saturating_mul(VALUE_BYTES + ENTRY_BYTES + 8))?;
    }
    Ok(n)
}

fn linear<'b, 'v>(args: Args<'b, 'v>) -> Out<'b, 'v> {
    let list = only(args)?;
    let n = size_of(list.as_ref());
    charge(n, n.saturating_mul(ENTRY_BYTES + VALUE_BYTES))?;
    Ok(list)
}

fn quadratic<'b, 'v>(args: Args<'b, 'v>) -> Out<'b, 'v> {
    let list = only(args)?;
    let n = size_of(list.as_ref());
    charge(n.saturating_mul(n) / 64, n.saturating_mul(ENTRY_BYTES + VALUE_BYTES))?;
    Ok(list)
}

fn string_arg<'a>(args: &'a [CowVal<'_, '_>], i: usize, function: &str) -> Result<&'a str, ExecutionError> {
    args.get(i)
        .and_then(|v| v.downcast_ref::<CelString>())
        .map(|s| s.inner())
        .ok_or_else(|| ExecutionError::function_error(function, format!("argument {} must be a string", i + 1)))
}

/// `n` of `replace` and `split`: `None` (all) when absent or negative.
fn count_arg(args: &[CowVal<'_, '_>], i: usize) -> Option<usize> {
    args.get(i).and_then(|v| v.downcast_ref::<CelInt>()).and_then(|n| usize::try_from(*n.inner()).ok())
}

/// `s.replace(from, to[, n])`, as the strings extension does it, charged before the result is built.
fn replace<'b, 'v>(args: Args<'b, 'v>) -> Out<'b, 'v> {
    let (s, from, to) =
        (string_arg(&args, 0, "replace")?, string_arg(&args, 1, "replace")?, string_arg(&args, 2, "replace")?);
    let limit = count_arg(&args, 3);
    let occurrences = if from.is_empty() { s.chars().count() + 1 } else { s.matches(from).count() };
    let replaced = limit.map_or(occurrences, |n| n.min(occurrences)) as u64;
    let size = (s.len() as u64).saturating_add(replaced.saturating_mul(to.len() as u64));
    charge(1, size.saturating_add(VALUE_BYTES))?;
    let out = match limit {
        Some(n) => s.replacen(from, to, n),
        None => s.replace(from, to),
    };
    Ok(CowVal::owned(CelString::from(out)))
}

/// `s.split(sep[, n])`, as the strings extension does it (an empty separator splits between code points, `n`
/// bounds the number of parts, 0 gives none), charged before the parts are built.
fn split<'b, 'v>(args: Args<'b, 'v>) -> Out<'b, 'v> {
    let (s, sep) = (string_arg(&args, 0, "split")?, string_arg(&args, 1, "split")?);
    let limit = match args.get(2).and_then(|v| v.downcast_ref::<CelInt>()) {
        Some(n) if *n.inner() == 0 => return Ok(CowVal::owned(CelList::from(Vec::<Box<dyn Val>>::new()))),
        _ => count_arg(&args, 2),
    };
    let pieces = if sep.is_empty() { s.chars().count() } else { s.matches(sep).count() + 1 };
    let parts = limit.map_or(pieces, |n| n.min(pieces)) as u64;
    charge(parts, (s.len() as u64).saturating_add(parts.saturating_mul(VALUE_BYTES + ENTRY_BYTES)))?;
    let parts: Vec<&str> = match (limit, sep.is_empty()) {
        (Some(n), true) => {
            let mut parts = Vec::new();
            let mut rest = s;
            while let Some(c) = rest.chars().next() {
                if parts.len() + 1 == n {
                    break;
                }
                let (head, tail) = rest.split_at(c.len_utf8());
                parts.push(head);
                rest = tail;
            }
            if !rest.is_empty() {
                parts.push(rest);
            }
            parts
        }
        (Some(n), false) => s.splitn(n, sep).collect(),
        (None, true) => s.char_indices().map(|(i, c)| &s[i..i + c.len_utf8()]).collect(),
        (None, false) => s.split(sep).collect(),
    };
    let parts: Vec<Box<dyn Val>> =
        parts.into_iter().map(|p| Box::new(CelString::from(p.to_owned())) as Box<dyn Val>).collect();
    Ok(CowVal::owned(CelList::from(parts)))
}

/// `list.join([sep])`: the strings of the list, `sep` between each, charged before the result is built.
fn join<'b, 'v>(args: Args<'b, 'v>) -> Out<'b, 'v> {
    let Some(list) = args.first() else {
        return Err(ExecutionError::invalid_argument_count(1, 0));
    };
    let sep = if args.len() > 1 { string_arg(&args, 1, "join")? } else { "" };
    let items =
        list.as_iterable().ok_or_else(|| ExecutionError::function_error("join", "the receiver must be a list"))?;
    let mut parts: Vec<&str> = Vec::new();
    let mut iter = items.iter();
    while let Some(item) = iter.next() {
        let part = item
            .downcast_ref::<CelString>()
            .ok_or_else(|| ExecutionError::function_error("join", "every element must be a string"))?;
        parts.push(part.inner());
    }
    let size = parts.iter().map(|p| p.len() as u64).sum::<u64>();
    let separators = (parts.len().saturating_sub(1) as u64).saturating_mul(sep.len() as u64);
    charge(1, size.saturating_add(separators).saturating_add(VALUE_BYTES))?;
    Ok(CowVal::owned(CelString::from(parts.join(sep))))
}
