//! The values of an upgrade: the document lade hands helm with `-f`, the tree helm computes
//! from it (which the preflight reads), `--set`, and the files written next to the bundle.
//!
//! This module owns helm's merge rules as far as lade needs them and never overwriting a
//! file. It does not own where the layers come from (helm, the chart, the command line).
//!
//! # Layers
//!
//! The `-f` document holds the *user-supplied* values, merged in this order, later wins: the
//! release's current values (`helm get values`), each `--values` file, each `--set`, then
//! `global.imageRegistry`. Mappings merge key by key; anything else is replaced; a `null` is
//! kept, because in helm a user-supplied `null` removes the chart's default ([`merge`]).
//!
//! The chart's defaults are deliberately not written into that document: it becomes the
//! release's user-supplied values, and defaults pinned there would override the defaults of
//! the next chart version (an old image tag would survive the next upgrade). Helm coalesces
//! the document onto the chart's defaults itself; [`coalesce`] does the same for the
//! preflight, so both see one tree.
//!
//! # `--set`
//!
//! A subset of helm's `--set` syntax: `a.b.c=value`, several separated by `,`, a `\` escaping
//! the next character (`a\.b=x` sets the key `a.b`; `v=1\,2` sets the string `1,2`). Values
//! are typed as helm types them: `true`/`false` (any case) are booleans, `null` removes the
//! key, a base-10 integer not starting with `0` (or `0` itself) is a number, anything else a
//! string. Not supported, and refused rather than misread: list indexes (`a[0]=x`) and list
//! values (`a={x,y}`); write those in a `--values` file. `--set-string`, `--set-file` and
//! `--set-json` have no counterpart.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use serde_yaml::{Mapping, Value};

use super::UpgradeError;

/// Parses a values document (a `--values` file, or what `helm get values` printed): a YAML
/// mapping, or nothing at all (empty text or `null`, which helm prints for a release without
/// user-supplied values).
pub fn parse_document(text: &str, origin: &str) -> Result<Value, UpgradeError> {
    let problem = |problem: String| UpgradeError::Values {
        origin: origin.to_string(),
        problem,
    };
    let value: Value =
        serde_yaml::from_str(text).map_err(|e| problem(format!("not valid YAML: {e}")))?;
    match value {
        Value::Null => Ok(Value::Mapping(Mapping::new())),
        Value::Mapping(_) => Ok(value),
        _ => Err(problem(
            "values must be a YAML mapping (key: value) at the top level".into(),
        )),
    }
}

/// The document as YAML text, for the `-f` file.
pub fn to_yaml(values: &Value, what: &str) -> Result<String, UpgradeError> {
    serde_yaml::to_string(values).map_err(|e| UpgradeError::Values {
        origin: what.to_string(),
        problem: format!("cannot be written as YAML: {e}"),
    })
}

/// Merges `overlay` into `base` as helm merges `-f` files: mappings key by key, anything else
/// replaced; nulls are kept.
pub fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Mapping(base), Value::Mapping(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing @ Value::Mapping(_)) if value.is_mapping() => {
                        merge(existing, value)
                    }
                    _ => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// The tree helm computes from a chart's `defaults` and the user-supplied values `user`:
/// user values win, mappings are coalesced key by key, and a user `null` removes the default.
pub fn coalesce(defaults: &Value, user: &Value) -> Value {
    let (Value::Mapping(defaults), Value::Mapping(user)) = (defaults, user) else {
        return user.clone();
    };
    let mut out = Mapping::new();
    for (key, default) in defaults {
        match user.get(key) {
            None => {
                out.insert(key.clone(), default.clone());
            }
            Some(Value::Null) => {}
            Some(value) => {
                out.insert(key.clone(), coalesce(default, value));
            }
        }
    }
    for (key, value) in user {
        if !defaults.contains_key(key) {
            out.insert(key.clone(), value.clone());
        }
    }
    Value::Mapping(out)
}

/// The value at `path`, if every step is a mapping holding the next key and the value is not
/// null.
pub fn get_path<'a>(values: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut current = values;
    for key in path {
        current = current.as_mapping()?.get(*key)?;
    }
    (!current.is_null()).then_some(current)
}

/// Sets `path` to `value`, creating mappings on the way and replacing anything in the way
/// that is not one, as helm's `--set` does.
pub fn set_path<S: AsRef<str>>(values: &mut Value, path: &[S], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = values;
    for key in parents {
        if !current.is_mapping() {
            *current = Value::Mapping(Mapping::new());
        }
        let mapping = current.as_mapping_mut().expect("made a mapping above");
        current = mapping
            .entry(Value::String(key.as_ref().to_string()))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    if !current.is_mapping() {
        *current = Value::Mapping(Mapping::new());
    }
    current
        .as_mapping_mut()
        .expect("made a mapping above")
        .insert(Value::String(last.as_ref().to_string()), value);
}

/// One `--set` argument: one or more `path=value` assignments (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct SetValue {
    assignments: Vec<(Vec<String>, Value)>,
}

impl SetValue {
    /// Applies the assignments to `values`, in order.
    pub fn apply(&self, values: &mut Value) {
        for (path, value) in &self.assignments {
            set_path(values, path, value.clone());
        }
    }
}

impl FromStr for SetValue {
    type Err = UpgradeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |problem: &str| UpgradeError::BadSet {
            input: input.to_string(),
            problem: problem.to_string(),
        };
        // Each character with whether a `\` escaped it.
        let mut chars = Vec::new();
        let mut iter = input.chars();
        while let Some(c) = iter.next() {
            match c {
                '\\' => chars.push((
                    iter.next().ok_or_else(|| bad("it ends with a lone '\\'"))?,
                    true,
                )),
                c => chars.push((c, false)),
            }
        }
        let mut assignments = Vec::new();
        for pair in chars.split(|&(c, escaped)| c == ',' && !escaped) {
            let Some(eq) = pair.iter().position(|&(c, escaped)| c == '=' && !escaped) else {
                return Err(bad("expected KEY=VALUE, e.g. image.tag=v1"));
            };
            let (key, value) = (&pair[..eq], &pair[eq + 1..]);
            if key
                .iter()
                .any(|&(c, escaped)| !escaped && (c == '[' || c == ']'))
            {
                return Err(bad(
                    "list indexes (a[0]=x) are not supported; put lists in a --values file",
                ));
            }
            if value
                .first()
                .is_some_and(|&(c, escaped)| c == '{' && !escaped)
            {
                return Err(bad(
                    "list values ({a,b}) are not supported; put lists in a --values file",
                ));
            }
            let path: Vec<String> = key
                .split(|&(c, escaped)| c == '.' && !escaped)
                .map(|segment| segment.iter().map(|&(c, _)| c).collect())
                .collect();
            if path.iter().any(String::is_empty) {
                return Err(bad("the key has an empty segment"));
            }
            let text: String = value.iter().map(|&(c, _)| c).collect();
            assignments.push((path, typed(&text)));
        }
        Ok(SetValue { assignments })
    }
}

/// A `--set` value typed as helm's `strvals` types it.
fn typed(text: &str) -> Value {
    if text.eq_ignore_ascii_case("true") {
        Value::Bool(true)
    } else if text.eq_ignore_ascii_case("false") {
        Value::Bool(false)
    } else if text.eq_ignore_ascii_case("null") {
        Value::Null
    } else if text == "0" {
        Value::Number(0.into())
    } else if let Some(n) = (!text.starts_with('0'))
        .then(|| text.parse::<i64>().ok())
        .flatten()
    {
        Value::Number(n.into())
    } else {
        Value::String(text.to_string())
    }
}

/// Name (without `.yaml`) of one of this run's files:
/// `<release>.<namespace>.<what>.<UTC time as 20240131T235959Z>`.
pub fn file_stem(release: &str, namespace: &str, what: &str, now: SystemTime) -> String {
    let time: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    format!("{release}.{namespace}.{what}.{time}")
}

/// The names tried for `stem`, in order: `<stem>.yaml`, `<stem>-1.yaml`, `<stem>-2.yaml`, …
fn candidates(dir: &Path, stem: &str) -> impl Iterator<Item = PathBuf> {
    let dir = dir.to_path_buf();
    let stem = stem.to_string();
    (0u32..).map(move |n| match n {
        0 => dir.join(format!("{stem}.yaml")),
        n => dir.join(format!("{stem}-{n}.yaml")),
    })
}

/// The path [`create_new`] would write now.
pub fn next_free(dir: &Path, stem: &str) -> PathBuf {
    candidates(dir, stem)
        .find(|path| !path.exists())
        .expect("the candidates never end")
}

/// Writes `content` to a new file in `dir` named after `stem` and returns its path. An
/// existing file is never replaced: the next free name is taken instead. Only the owner can
/// read it: values often hold passwords.
pub fn create_new(dir: &Path, stem: &str, content: &[u8]) -> Result<PathBuf, UpgradeError> {
    for path in candidates(dir, stem) {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        let mut file = match file {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(UpgradeError::io(&path, "creating the file")(e)),
        };
        file.write_all(content)
            .and_then(|()| file.sync_all())
            .map_err(UpgradeError::io(&path, "writing the file"))?;
        return Ok(path);
    }
    unreachable!("the candidates never end")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    fn set(input: &str) -> Value {
        let mut values = Value::Mapping(Mapping::new());
        input.parse::<SetValue>().unwrap().apply(&mut values);
        values
    }

    #[test]
    fn merge_replaces_scalars_and_lists_and_merges_mappings() {
        let mut base = yaml("a: {b: 1, c: [1, 2]}\nd: x\ne: {f: 1}\n");
        merge(
            &mut base,
            yaml("a: {c: [3], g: null}\nd: {h: 1}\ne: 7\nnew: 1\n"),
        );
        assert_eq!(
            base,
            yaml("a: {b: 1, c: [3], g: null}\nd: {h: 1}\ne: 7\nnew: 1\n")
        );
    }

    #[test]
    fn coalesce_lets_the_user_win_and_null_remove_a_default() {
        let defaults = yaml("image: {registry: r.io, tag: v1}\nkeep: 1\ndrop: 2\nmap: {a: 1}\n");
        let user = yaml("image: {tag: v2}\ndrop: null\nmap: scalar\nextra: null\n");
        assert_eq!(
            coalesce(&defaults, &user),
            yaml("image: {registry: r.io, tag: v2}\nkeep: 1\nmap: scalar\nextra: null\n")
        );
    }

    #[test]
    fn set_types_values_as_helm_does() {
        assert_eq!(
            set("a.b=true,c=FALSE,d=10,e=010,f=1.5,g=-3,h=,i=0,j=v1"),
            yaml("a: {b: true}\nc: false\nd: 10\ne: '010'\nf: '1.5'\ng: -3\nh: ''\ni: 0\nj: v1\n")
        );
        assert_eq!(set("a=null"), yaml("a: null\n"));
    }

    #[test]
    fn set_escapes_dots_commas_and_equals() {
        assert_eq!(
            set(r"ann.a\.b/c=x\,y,k=a=b"),
            yaml("ann: {a.b/c: 'x,y'}\nk: a=b\n")
        );
    }

    #[test]
    fn set_replaces_a_scalar_in_the_way() {
        let mut values = yaml("global: registry.io\n");
        "global.imageRegistry=10.0.0.1"
            .parse::<SetValue>()
            .unwrap()
            .apply(&mut values);
        assert_eq!(values, yaml("global: {imageRegistry: 10.0.0.1}\n"));
    }

    #[test]
    fn set_refuses_what_it_does_not_support() {
        for (input, expected) in [
            ("a", "expected KEY=VALUE"),
            ("a=1,b", "expected KEY=VALUE"),
            ("a[0]=x", "list indexes"),
            ("a={x,y}", "list values"),
            ("a..b=1", "empty segment"),
            ("=1", "empty segment"),
            ("a=x\\", "lone"),
        ] {
            let err = input.parse::<SetValue>().unwrap_err().to_string();
            assert!(
                err.contains(&format!("{input:?}")) && err.contains(expected),
                "{input}: {err}"
            );
        }
    }

    #[test]
    fn get_path_skips_nulls_and_non_mappings() {
        let values = yaml("global: {imageRegistry: r.io, empty: null}\nscalar: 1\n");
        assert_eq!(
            get_path(&values, &["global", "imageRegistry"]),
            Some(&Value::String("r.io".into()))
        );
        assert_eq!(get_path(&values, &["global", "empty"]), None);
        assert_eq!(get_path(&values, &["scalar", "x"]), None);
    }

    #[test]
    fn documents_must_be_mappings_or_empty() {
        for empty in ["", "null\n", "# nothing\n"] {
            assert_eq!(parse_document(empty, "x").unwrap(), yaml("{}"));
        }
        let err = parse_document("- a\n", "--values v.yaml").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--values v.yaml: values must be a YAML mapping"),
            "{err}"
        );
        let err = parse_document("a: [", "--values v.yaml").unwrap_err();
        assert!(err.to_string().contains("not valid YAML"), "{err}");
    }

    #[test]
    fn files_are_never_overwritten_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let stem = file_stem("demo", "demo-system", "values-backup", now);
        assert_eq!(stem, "demo.demo-system.values-backup.20231114T221320Z");
        assert_eq!(
            next_free(dir.path(), &stem),
            dir.path().join(format!("{stem}.yaml"))
        );
        let first = create_new(dir.path(), &stem, b"first").unwrap();
        assert_eq!(
            next_free(dir.path(), &stem),
            dir.path().join(format!("{stem}-1.yaml"))
        );
        let second = create_new(dir.path(), &stem, b"second").unwrap();
        assert_eq!(second, dir.path().join(format!("{stem}-1.yaml")));
        assert_eq!(std::fs::read(&first).unwrap(), b"first");
        assert_eq!(std::fs::read(&second).unwrap(), b"second");
        let mode = std::fs::metadata(&first).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
