//! A bundle's `hints.yaml`: image-reference templates over the helm chart's values, which say
//! which images the chart will run once installed with given values.
//!
//! This module owns the file's format, the template language and rendering a template
//! against a values tree. It does not own reading the file out of a bundle (`bundle`),
//! merging the chart's values with the user's (the caller hands in the final tree), or
//! checking that a rendered string is a valid image name (`reference`).
//!
//! # Format
//!
//! `hints.yaml` is a YAML list of strings, one template per entry:
//!
//! ```yaml
//! - "{{ .image.registry }}/{{ .image.repository }}:{{ .image.tag }}"
//! - "{{ .global.imageRegistry }}/mspider/proxy:{{ .sidecar-agent.image.tag }}"
//! ```
//!
//! An empty file (or a lone `null`) means no hints. Anything else at the top level, such as
//! a mapping, is rejected rather than guessed at.
//!
//! # Templates
//!
//! A template is literal text with placeholders `{{ .a.b.c }}`: a value path of one or more
//! segments, each written `.segment`, where a segment is letters, digits, `_` and `-` (so
//! subchart names like `sidecar-agent` work, which Go templates would need `index` for).
//! Whitespace inside the braces is optional. Paths are relative to the values root, like
//! helm's `.Values`. Nothing else of Go's template language (pipes, functions, variables,
//! `{{- -}}` trimming, bare `.`) is supported; it is a syntax error, not passed through.
//! A `}}` outside a placeholder is literal text.
//!
//! Entries are numbered from 1 in messages, the way a person counts the list.

use std::fmt;

use serde_yaml::Value;

/// Errors in `hints.yaml` or in rendering one of its templates, naming the entry, the
/// template and the offending path or column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HintsError {
    /// The file is not YAML at all.
    #[error("hints.yaml is not valid YAML: {reason}")]
    Yaml { reason: String },
    /// The file's top level is not a list.
    #[error(
        "hints.yaml must be a list of image-reference templates, but its top level is {found}"
    )]
    NotAList { found: String },
    /// An entry of the list is not a string.
    #[error("hints.yaml entry {entry} must be a string (an image-reference template), but it is {found}")]
    NotAString { entry: usize, found: String },
    /// A template's text does not follow the template syntax.
    #[error("{} {template:?}: column {column}: {problem}", origin(.entry))]
    Syntax {
        /// The entry number in `hints.yaml`, if the template came from there.
        entry: Option<usize>,
        template: String,
        /// 1-based character column of the problem in the template.
        column: usize,
        problem: String,
    },
    /// A template refers to a value that is missing or not a single value.
    #[error("{} {template:?}: {path} {problem}", origin(.entry))]
    Render {
        /// The entry number in `hints.yaml`, if the template came from there.
        entry: Option<usize>,
        template: String,
        /// The value path, written as in the template: `.image.tag`.
        path: String,
        problem: String,
    },
}

/// Where a template came from, for the start of a message.
fn origin(entry: &Option<usize>) -> String {
    match entry {
        Some(entry) => format!("hints.yaml entry {entry}"),
        None => "image template".to_owned(),
    }
}

/// The parsed `hints.yaml`: its templates, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hints {
    pub templates: Vec<Template>,
}

impl Hints {
    /// Parses the text of `hints.yaml` (see the module documentation for what is accepted).
    pub fn parse(yaml_text: &str) -> Result<Hints, HintsError> {
        let document: Value = serde_yaml::from_str(yaml_text).map_err(|e| HintsError::Yaml {
            reason: e.to_string(),
        })?;
        let entries = match document {
            Value::Null => return Ok(Hints::default()),
            Value::Sequence(entries) => entries,
            other => {
                return Err(HintsError::NotAList {
                    found: kind(&other).to_owned(),
                })
            }
        };
        let templates = entries
            .iter()
            .enumerate()
            .map(|(i, value)| match value {
                Value::String(text) => Template::parse_entry(text, Some(i + 1)),
                other => Err(HintsError::NotAString {
                    entry: i + 1,
                    found: kind(other).to_owned(),
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok(Hints { templates })
    }

    /// Renders every template against `values`, in file order, stopping at the first error.
    pub fn render_all(&self, values: &Value) -> Result<Vec<String>, HintsError> {
        self.templates.iter().map(|t| t.render(values)).collect()
    }
}

/// One image-reference template: literal text and `{{ .a.b.c }}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    entry: Option<usize>,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// A value path's segments, without the dots.
    Value(Vec<String>),
}

impl Template {
    /// Parses a template's text; errors name the template and the 1-based column at fault.
    pub fn parse(text: &str) -> Result<Template, HintsError> {
        Template::parse_entry(text, None)
    }

    /// Parses the template of `hints.yaml` entry `entry`, so that its errors name the entry.
    fn parse_entry(text: &str, entry: Option<usize>) -> Result<Template, HintsError> {
        let syntax = |byte: usize, problem: String| HintsError::Syntax {
            entry,
            template: text.to_owned(),
            column: text[..byte].chars().count() + 1,
            problem,
        };
        if text.trim().is_empty() {
            return Err(syntax(0, "the template is empty".to_owned()));
        }

        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut pos = 0;
        while let Some(found) = text[pos..].find("{{") {
            let open = pos + found;
            literal.push_str(&text[pos..open]);
            let inner_start = open + 2;
            let Some(close) = text[inner_start..].find("}}") else {
                return Err(syntax(open, "\"{{\" is not closed by \"}}\"".to_owned()));
            };
            let inner = &text[inner_start..inner_start + close];
            let segments = parse_placeholder(inner)
                .map_err(|(offset, problem)| syntax(inner_start + offset, problem))?;
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Value(segments));
            pos = inner_start + close + 2;
        }
        literal.push_str(&text[pos..]);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            text: text.to_owned(),
            entry,
            parts,
        })
    }

    /// The template as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The value paths the template refers to, as written (`.image.tag`), in order of first
    /// appearance and without repeats.
    pub fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = Vec::new();
        for part in &self.parts {
            if let Part::Value(segments) = part {
                let path = dotted(segments);
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
        }
        paths
    }

    /// Fills the placeholders from `values`, the chart's values tree.
    ///
    /// Strings are used as they are; numbers and booleans as helm prints them in the common
    /// cases (`10` -> `10`, `1.2` -> `1.2`, `1.0` -> `1`, `true` -> `true`). As in helm, an
    /// unquoted `1.10` is the number 1.1, so tags should be quoted in values files. A missing
    /// key, a null, a mapping or a list is an error naming the template and the path.
    pub fn render(&self, values: &Value) -> Result<String, HintsError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Value(segments) => {
                    let text = lookup(values, segments).map_err(|problem| HintsError::Render {
                        entry: self.entry,
                        template: self.text.clone(),
                        path: dotted(segments),
                        problem,
                    })?;
                    out.push_str(&text);
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Parses what is between `{{` and `}}` into path segments; an error carries the byte offset
/// in `inner` of the problem and a description.
fn parse_placeholder(inner: &str) -> Result<Vec<String>, (usize, String)> {
    const EXAMPLE: &str = "a value path such as .image.tag";
    let start = inner.len() - inner.trim_start().len();
    let body = inner.trim();
    if body.is_empty() {
        return Err((
            start,
            format!("the placeholder is empty; expected {EXAMPLE}"),
        ));
    }
    if body == "." {
        return Err((
            start,
            format!("a bare \".\" is not supported; expected {EXAMPLE}"),
        ));
    }
    if !body.starts_with('.') {
        return Err((
            start,
            format!(
                "expected {EXAMPLE}, found {body:?}; functions, variables, pipes and trim \
                 markers are not supported"
            ),
        ));
    }
    let mut segments = Vec::new();
    let mut offset = start + 1;
    for segment in body[1..].split('.') {
        if segment.is_empty() {
            return Err((
                offset,
                format!("empty segment in the value path; expected {EXAMPLE}"),
            ));
        }
        if let Some((i, c)) = segment
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        {
            let problem = if c.is_whitespace() {
                format!(
                    "unexpected text after the value path {:?}; pipes and functions are not supported",
                    &body[..offset - start + i]
                )
            } else {
                format!(
                    "unexpected {c:?} in the value path; a segment has letters, digits, '_' and '-' only"
                )
            };
            return Err((offset + i, problem));
        }
        segments.push(segment.to_owned());
        offset += segment.len() + 1;
    }
    Ok(segments)
}

/// Looks a path up and renders the value; the error completes "`.a.b` …".
fn lookup(values: &Value, segments: &[String]) -> Result<String, String> {
    let mut current = values;
    for (depth, segment) in segments.iter().enumerate() {
        let Value::Mapping(mapping) = untag(current) else {
            let parent = if depth == 0 {
                "the values".to_owned()
            } else {
                dotted(&segments[..depth])
            };
            return Err(format!(
                "is not set in the values ({parent} is {}, not a mapping)",
                kind(current)
            ));
        };
        current = find_key(mapping, segment).ok_or_else(|| {
            let mut problem = "is not set in the values".to_owned();
            // A helm habit: paths here are already relative to .Values.
            if depth == 0 && segment == "Values" {
                problem.push_str(
                    " (paths start at the values, so write .image.tag, not .Values.image.tag)",
                );
            }
            problem
        })?;
    }
    match untag(current) {
        Value::String(text) => Ok(text.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(number_text(n)),
        Value::Null => Err("is null in the values, not a value".to_owned()),
        other => Err(format!("is {}, not a single value", kind(other))),
    }
}

/// Finds `segment` among a mapping's keys. Helm turns every key into a string, so a key YAML
/// read as a number or boolean (`10:`, `true:`) is found by its text too.
fn find_key<'a>(mapping: &'a serde_yaml::Mapping, segment: &str) -> Option<&'a Value> {
    mapping.get(segment).or_else(|| {
        mapping.iter().find_map(|(key, value)| {
            let text = match key {
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            (text == segment).then_some(value)
        })
    })
}

/// A number as helm prints it in the common cases: integers in decimal, other numbers in the
/// shortest form that reads back the same, with no `.0` on whole numbers.
fn number_text(n: &serde_yaml::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    match n.as_f64() {
        // Rust's `Display` for f64 is the shortest round-trip form, and prints 1.0 as "1".
        Some(f) if f.is_finite() => f.to_string(),
        _ => n.to_string(),
    }
}

fn untag(value: &Value) -> &Value {
    match value {
        Value::Tagged(tagged) => untag(&tagged.value),
        other => other,
    }
}

fn kind(value: &Value) -> &'static str {
    match untag(value) {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn dotted(segments: &[String]) -> String {
    segments.iter().map(|s| format!(".{s}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUES: &str = r#"
image:
  registry: release.daocloud.io
  repository: mspider/api
  tag: v0.20.1
global:
  imageRegistry: 10.16.10.111
sidecar-agent:
  image:
    tag: "1.10"
numbers:
  int: 10
  float: 1.2
  whole: 1.0
  big: 20240101
  negative: -3
  yes: true
  empty: ""
  nothing: null
  list: [a, b]
  map: {a: 1}
  tagged: !custom v9
odd_keys:
  10: ten
  true: yes-key
scalar: just-a-string
"#;

    fn values() -> Value {
        serde_yaml::from_str(VALUES).unwrap()
    }

    fn render(template: &str) -> Result<String, HintsError> {
        Template::parse(template).unwrap().render(&values())
    }

    #[test]
    fn renders_placeholders() {
        let cases = [
            (
                "{{ .image.registry }}/{{ .image.repository }}:{{ .image.tag }}",
                "release.daocloud.io/mspider/api:v0.20.1",
            ),
            (
                "{{ .global.imageRegistry }}/mspider/proxy:{{ .sidecar-agent.image.tag }}",
                "10.16.10.111/mspider/proxy:1.10",
            ),
            // Whitespace inside the braces is optional and may be tabs.
            ("{{.image.tag}}", "v0.20.1"),
            ("{{   .image.tag\t}}", "v0.20.1"),
            ("x{{.image.tag }}y{{ .image.tag}}z", "xv0.20.1yv0.20.1z"),
            // Literal-only templates and stray closing braces are text.
            (
                "docker.io/library/busybox:1.36",
                "docker.io/library/busybox:1.36",
            ),
            ("a}}b", "a}}b"),
            // Scalars of other types.
            ("{{ .numbers.int }}", "10"),
            ("{{ .numbers.float }}", "1.2"),
            ("{{ .numbers.whole }}", "1"),
            ("{{ .numbers.big }}", "20240101"),
            ("{{ .numbers.negative }}", "-3"),
            ("{{ .numbers.yes }}", "true"),
            ("a{{ .numbers.empty }}b", "ab"),
            ("{{ .numbers.tagged }}", "v9"),
            ("{{ .odd_keys.10 }}/{{ .odd_keys.true }}", "ten/yes-key"),
            ("{{ .scalar }}", "just-a-string"),
        ];
        for (template, expected) in cases {
            assert_eq!(render(template).unwrap(), expected, "{template}");
        }
    }

    #[test]
    fn lists_paths_in_order_without_repeats() {
        let t = Template::parse(
            "{{ .image.registry }}/{{.image.repository}}:{{ .sidecar-agent.image.tag }}-{{ .image.registry }}",
        )
        .unwrap();
        assert_eq!(
            t.paths(),
            [
                ".image.registry",
                ".image.repository",
                ".sidecar-agent.image.tag"
            ]
        );
        assert!(Template::parse("busybox").unwrap().paths().is_empty());
    }

    #[test]
    fn render_errors_name_template_and_path() {
        let cases = [
            ("{{ .app.image.tag }}", ".app.image.tag", "is not set in the values"),
            ("{{ .image.digest }}", ".image.digest", "is not set in the values"),
            ("{{ .scalar.tag }}", ".scalar.tag", "is not set in the values (.scalar is a string, not a mapping)"),
            ("{{ .numbers.nothing }}", ".numbers.nothing", "is null in the values"),
            ("{{ .numbers.list }}", ".numbers.list", "is a list, not a single value"),
            ("{{ .numbers.map }}", ".numbers.map", "is a mapping, not a single value"),
            ("{{ .image }}", ".image", "is a mapping, not a single value"),
            (
                "{{ .Values.image.tag }}",
                ".Values.image.tag",
                "is not set in the values (paths start at the values, so write .image.tag, not .Values.image.tag)",
            ),
        ];
        for (template, path, problem) in cases {
            let err = render(template).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(&err, HintsError::Render { path: p, .. } if p == path),
                "{err:?}"
            );
            assert!(
                text.contains(&format!("{template:?}")),
                "{text} should name {template}"
            );
            assert!(
                text.contains(&format!("{path} {problem}")),
                "{text} should say {path} {problem}"
            );
        }
        // Values that are not a mapping at all.
        let err = Template::parse("{{ .a }}")
            .unwrap()
            .render(&Value::Null)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("the values is null, not a mapping"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_name_template_and_column() {
        // (template, column, problem)
        let cases = [
            ("", 1, "the template is empty"),
            ("   ", 1, "the template is empty"),
            ("reg/{{ .image.tag", 5, "is not closed"),
            ("a{{}}", 4, "placeholder is empty"),
            ("{{ . }}", 4, "a bare \".\""),
            ("{{ image.tag }}", 4, "expected a value path"),
            ("{{ $tag }}", 4, "variables"),
            ("{{ default \"x\" .tag }}", 4, "functions"),
            ("{{- .tag -}}", 3, "trim markers"),
            (
                "{{ .image.tag | quote }}",
                14,
                "unexpected text after the value path \".image.tag\"",
            ),
            ("{{ .image..tag }}", 11, "empty segment"),
            ("{{ .image. }}", 11, "empty segment"),
            ("{{ .image.ta$g }}", 13, "unexpected '$'"),
            ("é{{ .a.b/c }}", 9, "unexpected '/'"),
            ("{{ {{ .a }}", 4, "expected a value path"),
        ];
        for (template, column, problem) in cases {
            let err = Template::parse(template).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(&err, HintsError::Syntax { column: c, entry: None, .. } if *c == column),
                "{template}: {err:?}"
            );
            assert!(
                text.starts_with(&format!("image template {template:?}: column {column}: ")),
                "{text}"
            );
            assert!(text.contains(problem), "{text} should say {problem}");
        }
    }

    #[test]
    fn parses_hints_file() {
        let hints = Hints::parse(
            r#"
- "{{ .image.registry }}/{{ .image.repository }}:{{ .image.tag }}"
- "{{ .global.imageRegistry }}/mspider/proxy:{{ .sidecar-agent.image.tag }}"
- docker.io/library/busybox:1.36
"#,
        )
        .unwrap();
        assert_eq!(hints.templates.len(), 3);
        assert_eq!(hints.templates[2].text(), "docker.io/library/busybox:1.36");
        assert_eq!(
            hints.render_all(&values()).unwrap(),
            [
                "release.daocloud.io/mspider/api:v0.20.1",
                "10.16.10.111/mspider/proxy:1.10",
                "docker.io/library/busybox:1.36",
            ]
        );
        assert_eq!(Hints::parse("").unwrap(), Hints::default());
        assert_eq!(Hints::parse("# nothing yet\n").unwrap(), Hints::default());
        assert_eq!(Hints::parse("[]").unwrap(), Hints::default());
    }

    #[test]
    fn hints_errors_name_file_and_entry() {
        let err = Hints::parse("- a:1\n- \"{{ .app.image.tag }}\"\n")
            .unwrap()
            .render_all(&values())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "hints.yaml entry 2 \"{{ .app.image.tag }}\": .app.image.tag is not set in the values"
        );

        let err = Hints::parse("- ok\n- \"{{ .a | b }}\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "hints.yaml entry 2 \"{{ .a | b }}\": column 6: unexpected text after the value path \".a\"; \
             pipes and functions are not supported"
        );

        let cases = [
            ("images:\n  - a\n", "hints.yaml must be a list", "a mapping"),
            ("just-a-string", "hints.yaml must be a list", "a string"),
            (
                "- a\n- 3\n",
                "hints.yaml entry 2 must be a string",
                "a number",
            ),
            (
                "- a\n- [b]\n",
                "hints.yaml entry 2 must be a string",
                "a list",
            ),
            (
                "- a\n- \"\"\n",
                "hints.yaml entry 2 \"\"",
                "the template is empty",
            ),
            ("- [unclosed\n", "hints.yaml is not valid YAML", ""),
        ];
        for (yaml, start, detail) in cases {
            let text = Hints::parse(yaml).unwrap_err().to_string();
            assert!(
                text.starts_with(start),
                "{text:?} should start with {start:?}"
            );
            assert!(text.contains(detail), "{text:?} should say {detail:?}");
        }
    }
}
