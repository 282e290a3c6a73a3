//! What the command line changes in an experiment before it is typed: `--set section.key=value`
//! overrides (torchtitan's `--training.steps 10`, Hydra's `key=value`) and `parallel.dp = "auto"`.
//! Both work on the TOML value, so an override goes through exactly what the same line in the file
//! would: its type, unknown keys, then `validate`. The resolved experiment (`Experiment::to_toml`)
//! is what metrics.h5 and every checkpoint record, overrides and the chosen dp included.
use toml::{Table, Value};

/// What the command line adds to an experiment file.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides<'a> {
    /// `section.key=value` pairs, applied in order (a later one wins).
    pub set: &'a [String],
    /// Ranks of the job, when known: `parallel.dp = "auto"` becomes world / parallel.sp.
    pub world: Option<usize>,
    /// The caller sets `parallel.dp` itself after loading (`ulysses eval` picks its own mesh), so
    /// `"auto"` stands for 1 until then.
    pub dp_replaced: bool,
}

/// The `--set` flag of the commands that read an experiment (train, check, eval).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SetArgs {
    /// Change one key of the experiment as if the file said so, e.g. `--set train.steps=100`,
    /// `--set run.name=try2`, `--set 'data.paths=["data/other"]'`. The value is TOML (a bare word
    /// is a string); repeat the flag for more keys. Checked like the file, and recorded with the
    /// resolved experiment in metrics.h5 and every checkpoint.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
}

/// Applies every override to `table`; the error names the override and what is wrong with it.
pub(super) fn apply(table: &mut Table, set: &[String]) -> Result<(), String> {
    for one in set {
        apply_one(table, one).map_err(|why| format!("--set {one}: {why}"))?;
    }
    Ok(())
}

fn apply_one(table: &mut Table, one: &str) -> Result<(), String> {
    let (key, raw) = one.split_once('=').ok_or("expected SECTION.KEY=VALUE, e.g. train.steps=100")?;
    let path: Vec<&str> = key.trim().split('.').map(str::trim).collect();
    if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
        return Err(format!("`{}` is not a key inside a section; write SECTION.KEY, e.g. train.steps", key.trim()));
    }
    let value = parse_value(raw.trim());
    let (last, sections) = path.split_last().expect("at least two parts");
    let mut at = table;
    for (i, name) in sections.iter().enumerate() {
        let entry = at.entry(name.to_string()).or_insert_with(|| Value::Table(Table::new()));
        at = entry.as_table_mut().ok_or_else(|| format!("`{}` is a value, not a section", path[..=i].join(".")))?;
    }
    at.insert(last.to_string(), value);
    Ok(())
}

/// A TOML value (`100`, `3e-4`, `true`, `"x"`, `[1, 2]`), or else the text itself as a string, so
/// `run.name=try2` and `parallel.device=cuda` need no quotes.
fn parse_value(raw: &str) -> Value {
    toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

/// Whether the experiment asks for `parallel.dp = "auto"`.
pub(super) fn wants_auto_dp(table: &Table) -> bool {
    dp_entry(table).is_some_and(|v| v.as_str() == Some("auto"))
}

fn dp_entry(table: &Table) -> Option<&Value> {
    table.get("parallel").and_then(Value::as_table).and_then(|p| p.get("dp"))
}

/// Replaces `parallel.dp = "auto"` by world / parallel.sp: every rank that is not a sequence
/// parallel rank is a data-parallel one.
pub(super) fn resolve_auto_dp(table: &mut Table, o: &Overrides) -> Result<(), String> {
    if !wants_auto_dp(table) {
        return Ok(());
    }
    let parallel = table.get_mut("parallel").and_then(Value::as_table_mut).expect("dp is in [parallel]");
    if o.dp_replaced {
        parallel.insert("dp".into(), Value::Integer(1));
        return Ok(());
    }
    let world = o.world.ok_or(
        "parallel.dp = \"auto\" is the number of ranks / parallel.sp, and the number of ranks is not known here; \
         pass --world-size N (ulysses check), or set a number",
    )?;
    let sp = match parallel.get("sp") {
        None => 1,
        Some(v) => match v.as_integer() {
            Some(sp) if sp > 0 => sp as usize,
            // A bad sp is reported by typing and validation; dp stays a number so that is the only problem.
            _ => 1,
        },
    };
    if world % sp != 0 {
        return Err(format!(
            "parallel.dp = \"auto\": the job's {world} ranks are not a multiple of parallel.sp = {sp}; \
             run on a multiple of {sp} ranks, or set parallel.dp"
        ));
    }
    parallel.insert("dp".into(), Value::Integer((world / sp) as i64));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn values_are_toml_or_else_strings() {
        let mut t = table("[train]\nsteps = 3\n");
        let set = ["train.steps=100", "train.lr = 3e-4", "run.name=try2", "data.paths=[\"a\", \"b\"]", "x.y.z=true"]
            .map(String::from);
        apply(&mut t, &set).unwrap();
        assert_eq!(t["train"]["steps"].as_integer(), Some(100));
        assert_eq!(t["train"]["lr"].as_float(), Some(3e-4));
        assert_eq!(t["run"]["name"].as_str(), Some("try2"));
        assert_eq!(t["data"]["paths"].as_array().unwrap().len(), 2);
        assert_eq!(t["x"]["y"]["z"].as_bool(), Some(true));
    }

    #[test]
    fn malformed_overrides_name_themselves() {
        let mut t = table("[train]\nsteps = 3\n");
        for (bad, why) in [
            ("train.steps", "expected SECTION.KEY=VALUE"),
            ("steps=3", "not a key inside a section"),
            ("train..steps=3", "not a key inside a section"),
            ("train.steps.x=3", "`train.steps` is a value, not a section"),
        ] {
            let e = apply(&mut t, &[bad.to_string()]).unwrap_err();
            assert!(e.starts_with(&format!("--set {bad}: ")) && e.contains(why), "{e}");
        }
    }

    #[test]
    fn auto_dp_is_the_ranks_over_sp() {
        let on = |world| Overrides { world, ..Overrides::default() };
        let mut t = table("[parallel]\nsp = 2\ndp = \"auto\"\n");
        resolve_auto_dp(&mut t, &on(Some(8))).unwrap();
        assert_eq!(t["parallel"]["dp"].as_integer(), Some(4));
        let mut t = table("[parallel]\nsp = 2\ndp = \"auto\"\n");
        let e = resolve_auto_dp(&mut t, &on(Some(3))).unwrap_err();
        assert!(e.contains("3 ranks are not a multiple of parallel.sp = 2"), "{e}");
        let e = resolve_auto_dp(&mut t, &on(None)).unwrap_err();
        assert!(e.contains("--world-size"), "{e}");
        resolve_auto_dp(&mut t, &Overrides { dp_replaced: true, ..on(None) }).unwrap();
        assert_eq!(t["parallel"]["dp"].as_integer(), Some(1));
        let mut t = table("[parallel]\ndp = 2\n");
        resolve_auto_dp(&mut t, &on(Some(8))).unwrap();
        assert_eq!(t["parallel"]["dp"].as_integer(), Some(2), "a number stays as it is");
    }
}
