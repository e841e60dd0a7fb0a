//! Strict parsing of the generation-1 GraphQL request: one query with one token field,
//! its arguments written inline, and a selection of token-set fields.
//!
//! Error messages name the part of the request that is wrong but never echo a string
//! value, because those hold the code, the refresh token or the signature.

use std::collections::BTreeMap;
use std::fmt;

use graphql_parser::query::{
    Definition, Document, Field, OperationDefinition, Selection, SelectionSet, Value,
};
use serde::Deserialize;

/// The two token operations of generation 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Operation {
    Exchange,
    Refresh,
}

impl Operation {
    /// Returns the top-level GraphQL field of this operation.
    pub fn field(self) -> &'static str {
        match self {
            Operation::Exchange => "get_auth_access_token",
            Operation::Refresh => "refresh_auth_access_token",
        }
    }

    /// Returns the input key that carries the code or refresh token.
    pub fn token_argument(self) -> &'static str {
        match self {
            Operation::Exchange => "code",
            Operation::Refresh => "refresh_token",
        }
    }

    fn from_field(name: &str) -> Option<Self> {
        [Operation::Exchange, Operation::Refresh]
            .into_iter()
            .find(|operation| operation.field() == name)
    }
}

/// A field of the token set that a query can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ResultField {
    AccessToken,
    RefreshToken,
    ExpiresIn,
    Scopes,
}

impl ResultField {
    const ALL: [ResultField; 4] = [
        ResultField::AccessToken,
        ResultField::RefreshToken,
        ResultField::ExpiresIn,
        ResultField::Scopes,
    ];

    /// Returns the GraphQL name of this field.
    pub fn name(self) -> &'static str {
        match self {
            ResultField::AccessToken => "access_token",
            ResultField::RefreshToken => "refresh_token",
            ResultField::ExpiresIn => "expires_in",
            ResultField::Scopes => "scopes",
        }
    }
}

/// A well-formed token request, not yet checked against the client or the grants.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct TokenRequest {
    pub operation: Operation,
    /// The auth code or the refresh token.
    pub token: String,
    pub client_id: String,
    /// Milliseconds since the Unix epoch, as the client sent it.
    pub timestamp_ms: i64,
    /// Lowercase hex, as the client sent it.
    pub signature: String,
    /// Selected fields without duplicates, in the order of the query.
    pub fields: Vec<ResultField>,
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRequest")
            .field("operation", &self.operation)
            .field("client_id", &self.client_id)
            .field("timestamp_ms", &self.timestamp_ms)
            .field("fields", &self.fields)
            .finish_non_exhaustive()
    }
}

/// A malformed request. The message is safe to send back and to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(super) struct QueryError(String);

fn invalid(message: impl Into<String>) -> QueryError {
    QueryError(message.into())
}

/// The JSON envelope of a GraphQL request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    query: String,
    #[serde(default)]
    variables: Option<serde_json::Value>,
    #[serde(default, rename = "operationName")]
    operation_name: Option<String>,
}

/// Parses a request body `{"query": "..."}`. `variables` may only be null or empty and
/// `operationName` may only name the one operation.
pub(super) fn parse_body(body: &[u8]) -> Result<TokenRequest, QueryError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| invalid("the request body is not valid JSON"))?;
    // Checked first because serde would also read a struct from a JSON array.
    let shape_error = || {
        invalid(
            "the request body must be a JSON object with a string `query` and \
             optionally `variables` and `operationName`",
        )
    };
    if !value.is_object() {
        return Err(shape_error());
    }
    let envelope: Envelope = serde_json::from_value(value).map_err(|_| shape_error())?;
    match &envelope.variables {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) if map.is_empty() => {}
        Some(_) => return Err(invalid("variables are not supported")),
    }

    let document = parse_document(&envelope.query)?;
    let (name, selection_set) = single_query(&document)?;
    if let Some(requested) = &envelope.operation_name
        && name != Some(requested.as_str())
    {
        return Err(invalid("operationName does not name the query's operation"));
    }
    token_request(selection_set)
}

/// Parses the query text alone.
#[cfg(test)]
fn parse_query(text: &str) -> Result<TokenRequest, QueryError> {
    let document = parse_document(text)?;
    let (_, selection_set) = single_query(&document)?;
    token_request(selection_set)
}

fn parse_document(text: &str) -> Result<Doc, QueryError> {
    let document = graphql_parser::parse_query::<String>(text).map_err(|error| {
        // The parser's message can quote the offending token, which may be a secret,
        // so only the position is kept.
        let message = error.to_string();
        let position: String = message
            .split_once("Parse error at ")
            .map(|(_, rest)| {
                rest.chars()
                    .take_while(|ch| ch.is_ascii_digit() || *ch == ':')
                    .collect()
            })
            .unwrap_or_default();
        if position.is_empty() {
            invalid("the query is not valid GraphQL")
        } else {
            invalid(format!(
                "the query is not valid GraphQL (syntax error at line:column {position})"
            ))
        }
    })?;
    Ok(document.into_static())
}

/// The parsed AST, made independent of the query text.
type Doc = Document<'static, String>;
type Selections = SelectionSet<'static, String>;
type FieldNode = Field<'static, String>;
type InputObject = BTreeMap<String, Value<'static, String>>;

/// Returns the name and selection set of the document's only operation, a query.
fn single_query(document: &Doc) -> Result<(Option<&str>, &Selections), QueryError> {
    let [definition] = document.definitions.as_slice() else {
        return Err(invalid("the document must contain exactly one operation"));
    };
    let operation = match definition {
        Definition::Operation(operation) => operation,
        Definition::Fragment(_) => return Err(invalid("fragments are not supported")),
    };
    match operation {
        OperationDefinition::SelectionSet(selection_set) => Ok((None, selection_set)),
        OperationDefinition::Query(query) => {
            if !query.variable_definitions.is_empty() {
                return Err(invalid("variables are not supported"));
            }
            if !query.directives.is_empty() {
                return Err(invalid("directives are not supported"));
            }
            Ok((query.name.as_deref(), &query.selection_set))
        }
        OperationDefinition::Mutation(_) | OperationDefinition::Subscription(_) => {
            Err(invalid("the operation must be a query"))
        }
    }
}

fn token_request(selection_set: &Selections) -> Result<TokenRequest, QueryError> {
    let [Selection::Field(field)] = selection_set.items.as_slice() else {
        return Err(invalid("the query must select exactly one field"));
    };
    plain_field(field)?;
    let Some(operation) = Operation::from_field(&field.name) else {
        return Err(invalid(format!(
            "unknown field `{}`: expected `get_auth_access_token` or `refresh_auth_access_token`",
            field.name
        )));
    };

    let input = input_object(field)?;
    check_input_keys(input, operation)?;
    Ok(TokenRequest {
        operation,
        token: string_input(input, operation.token_argument())?,
        client_id: string_input(input, "client_id")?,
        timestamp_ms: integer_input(input, "timestamp")?,
        signature: string_input(input, "signature")?,
        fields: result_fields(&field.selection_set)?,
    })
}

/// Rejects aliases and directives, which the emulator does not support on any field.
fn plain_field(field: &FieldNode) -> Result<(), QueryError> {
    if field.alias.is_some() {
        return Err(invalid(format!(
            "field `{}` has an alias, which is not supported",
            field.name
        )));
    }
    if !field.directives.is_empty() {
        return Err(invalid(format!(
            "field `{}` has directives, which are not supported",
            field.name
        )));
    }
    Ok(())
}

fn input_object(field: &FieldNode) -> Result<&InputObject, QueryError> {
    let [(name, value)] = field.arguments.as_slice() else {
        return Err(invalid(format!(
            "`{}` takes exactly one argument, `input`",
            field.name
        )));
    };
    if name != "input" {
        return Err(invalid(format!(
            "unknown argument `{name}`: expected `input`"
        )));
    }
    match value {
        Value::Object(object) => Ok(object),
        Value::Variable(_) => Err(invalid("variables are not supported")),
        _ => Err(invalid("`input` must be an object literal")),
    }
}

/// Rejects unknown keys. Missing keys are reported by the lookups that need them.
///
/// NOTE: graphql-parser 0.4 stores an object literal in a map, so a key written twice
/// keeps only its last value and cannot be rejected here.
fn check_input_keys(input: &InputObject, operation: Operation) -> Result<(), QueryError> {
    let expected = [
        operation.token_argument(),
        "client_id",
        "timestamp",
        "signature",
    ];
    match input.keys().find(|key| !expected.contains(&key.as_str())) {
        Some(key) => Err(invalid(format!(
            "unknown input key `{key}`: expected `{}`, `client_id`, `timestamp` and `signature`",
            operation.token_argument()
        ))),
        None => Ok(()),
    }
}

/// NOTE: graphql-parser 0.4.1 decodes the escape `\b` as U+0010 where GraphQL means
/// U+0008 (backspace), so a value containing a backspace arrives changed and its
/// signature does not verify.
fn string_input(input: &InputObject, key: &str) -> Result<String, QueryError> {
    match input.get(key) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Variable(_)) => Err(invalid("variables are not supported")),
        Some(_) => Err(invalid(format!("input key `{key}` must be a string"))),
        None => Err(invalid(format!("input key `{key}` is missing"))),
    }
}

fn integer_input(input: &InputObject, key: &str) -> Result<i64, QueryError> {
    match input.get(key) {
        Some(Value::Int(number)) => number
            .as_i64()
            .ok_or_else(|| invalid(format!("input key `{key}` is out of range"))),
        Some(Value::Variable(_)) => Err(invalid("variables are not supported")),
        Some(_) => Err(invalid(format!("input key `{key}` must be an integer"))),
        None => Err(invalid(format!("input key `{key}` is missing"))),
    }
}

/// Reads the token-set fields a query selects. A field selected twice is returned once,
/// as GraphQL merges identical selections.
fn result_fields(selection_set: &Selections) -> Result<Vec<ResultField>, QueryError> {
    if selection_set.items.is_empty() {
        return Err(invalid("the token field must select at least one subfield"));
    }
    let mut fields = Vec::new();
    for selection in &selection_set.items {
        let Selection::Field(field) = selection else {
            return Err(invalid("fragments are not supported"));
        };
        plain_field(field)?;
        if !field.arguments.is_empty() || !field.selection_set.items.is_empty() {
            return Err(invalid(format!(
                "field `{}` takes no arguments or subfields",
                field.name
            )));
        }
        let Some(known) = ResultField::ALL
            .into_iter()
            .find(|known| known.name() == field.name)
        else {
            return Err(invalid(format!(
                "unknown field `{}`: expected `access_token`, `refresh_token`, `expires_in` or `scopes`",
                field.name
            )));
        };
        if !fields.contains(&known) {
            fields.push(known);
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiki::graphql::graphql_string;

    /// Writes a query the way tokend's client does, with every argument inline.
    fn client_query(field: &str, token_argument: &str, token: &str) -> String {
        format!(
            "query {{\n  {field}(input: {{\n    {token_argument}: {}\n    client_id: {}\n    \
             timestamp: 1620621619569\n    signature: {}\n  }}) {{\n    access_token\n    \
             refresh_token\n    expires_in\n    scopes\n  }}\n}}\n",
            graphql_string(token),
            graphql_string("client-1"),
            graphql_string("abc123"),
        )
    }

    fn exchange_query(input: &str, selection: &str) -> String {
        format!("{{ get_auth_access_token(input: {{{input}}}) {{ {selection} }} }}")
    }

    const INPUT: &str = r#"code: "c", client_id: "id", timestamp: 5, signature: "s""#;

    #[test]
    fn client_exchange_query_parses() {
        let query = client_query("get_auth_access_token", "code", "the-code");
        let request = parse_query(&query).unwrap();
        assert_eq!(request.operation, Operation::Exchange);
        assert_eq!(request.token, "the-code");
        assert_eq!(request.client_id, "client-1");
        assert_eq!(request.timestamp_ms, 1620621619569);
        assert_eq!(request.signature, "abc123");
        assert_eq!(request.fields, ResultField::ALL);
    }

    #[test]
    fn client_refresh_query_parses() {
        let query = client_query("refresh_auth_access_token", "refresh_token", "rt");
        let request = parse_query(&query).unwrap();
        assert_eq!(request.operation, Operation::Refresh);
        assert_eq!(request.token, "rt");
    }

    #[test]
    fn escaped_strings_round_trip() {
        for token in [
            "quote\"inside",
            "back\\slash",
            "line\nbreak",
            "tab\tand\rreturn",
            "caf\u{e9}",
            "control\u{1}char",
            "\\\"\\n",
        ] {
            let query = client_query("get_auth_access_token", "code", token);
            let request = parse_query(&query).unwrap();
            assert_eq!(request.token, token, "token {token:?}");
        }
    }

    #[test]
    fn unicode_escape_is_decoded() {
        let input = r#"code: "caf\u00e9 \u00E9", client_id: "id", timestamp: 5, signature: "s""#;
        let request = parse_query(&exchange_query(input, "access_token")).unwrap();
        assert_eq!(request.token, "caf\u{e9} \u{e9}");
    }

    #[test]
    fn shorthand_and_named_queries_parse() {
        let shorthand = exchange_query(INPUT, "access_token");
        assert!(parse_query(&shorthand).is_ok());
        let named = format!("query Exchange {shorthand}");
        assert!(parse_query(&named).is_ok());
    }

    #[test]
    fn selection_is_kept_in_order_once() {
        let query = exchange_query(INPUT, "scopes access_token scopes");
        let request = parse_query(&query).unwrap();
        assert_eq!(
            request.fields,
            [ResultField::Scopes, ResultField::AccessToken]
        );
    }

    #[test]
    fn malformed_queries_are_rejected() {
        let cases = [
            ("empty", String::new()),
            ("syntax", "{ get_auth_access_token(".to_owned()),
            (
                "mutation",
                format!("mutation {}", exchange_query(INPUT, "scopes")),
            ),
            (
                "two operations",
                format!("{0} {0}", exchange_query(INPUT, "scopes")),
            ),
            (
                "fragment definition",
                format!(
                    "{} fragment F on T {{ a }}",
                    exchange_query(INPUT, "scopes")
                ),
            ),
            (
                "variable definition",
                "query ($c: String) { get_auth_access_token(input: {code: $c}) { scopes } }"
                    .to_owned(),
            ),
            (
                "variable value",
                exchange_query(
                    r#"code: $c, client_id: "id", timestamp: 5, signature: "s""#,
                    "scopes",
                ),
            ),
            (
                "two fields",
                format!("{{ a get_auth_access_token(input: {{{INPUT}}}) {{ scopes }} }}"),
            ),
            (
                "unknown field",
                format!("{{ get_token(input: {{{INPUT}}}) {{ scopes }} }}"),
            ),
            (
                "alias",
                format!("{{ t: get_auth_access_token(input: {{{INPUT}}}) {{ scopes }} }}"),
            ),
            (
                "directive",
                format!(
                    "{{ get_auth_access_token(input: {{{INPUT}}}) @skip(if: false) {{ scopes }} }}"
                ),
            ),
            (
                "argument name",
                format!("{{ get_auth_access_token(data: {{{INPUT}}}) {{ scopes }} }}"),
            ),
            (
                "two arguments",
                format!("{{ get_auth_access_token(input: {{{INPUT}}}, x: 1) {{ scopes }} }}"),
            ),
            (
                "input not object",
                r#"{ get_auth_access_token(input: "x") { scopes } }"#.to_owned(),
            ),
            (
                "missing key",
                exchange_query(r#"code: "c", client_id: "id", timestamp: 5"#, "scopes"),
            ),
            (
                "extra key",
                exchange_query(&format!("{INPUT}, scope: \"x\""), "scopes"),
            ),
            (
                "wrong token key",
                exchange_query(
                    r#"refresh_token: "c", client_id: "id", timestamp: 5, signature: "s""#,
                    "scopes",
                ),
            ),
            (
                "timestamp string",
                exchange_query(
                    r#"code: "c", client_id: "id", timestamp: "5", signature: "s""#,
                    "scopes",
                ),
            ),
            (
                "timestamp float",
                exchange_query(
                    r#"code: "c", client_id: "id", timestamp: 5.0, signature: "s""#,
                    "scopes",
                ),
            ),
            (
                "code integer",
                exchange_query(
                    r#"code: 7, client_id: "id", timestamp: 5, signature: "s""#,
                    "scopes",
                ),
            ),
            (
                "no selection",
                format!("{{ get_auth_access_token(input: {{{INPUT}}}) }}"),
            ),
            (
                "unknown subfield",
                exchange_query(INPUT, "scopes token_type"),
            ),
            ("typename", exchange_query(INPUT, "__typename")),
            (
                "subfield alias",
                exchange_query(INPUT, "token: access_token"),
            ),
            (
                "subfield argument",
                exchange_query(INPUT, "scopes(first: 1)"),
            ),
            (
                "subfield selection",
                exchange_query(INPUT, "scopes { name }"),
            ),
            (
                "inline fragment",
                exchange_query(INPUT, "... on T { scopes }"),
            ),
        ];
        for (case, query) in cases {
            assert!(parse_query(&query).is_err(), "case {case} was accepted");
        }
    }

    #[test]
    fn errors_do_not_echo_strings() {
        let broken = r#"{ get_auth_access_token(input: {code: "SECRET-CODE" "SECRET-TWO"}) }"#;
        let error = parse_query(broken).unwrap_err().to_string();
        assert!(!error.contains("SECRET"), "message: {error}");
        assert!(error.contains("line:column 1:"), "message: {error}");

        let wrong_type = exchange_query(
            r#"code: "c", client_id: "id", timestamp: 5, signature: ["SECRET-SIG"]"#,
            "scopes",
        );
        let error = parse_query(&wrong_type).unwrap_err().to_string();
        assert!(!error.contains("SECRET"), "message: {error}");
    }

    #[test]
    fn body_envelope_is_checked() {
        let query = serde_json::Value::String(exchange_query(INPUT, "scopes"));
        let accepted = [
            serde_json::json!({ "query": query }),
            serde_json::json!({ "query": query, "variables": null }),
            serde_json::json!({ "query": query, "variables": {} }),
            serde_json::json!({ "query": format!("query T {}", query.as_str().unwrap()), "operationName": "T" }),
        ];
        for body in accepted {
            let result = parse_body(body.to_string().as_bytes());
            assert!(result.is_ok(), "rejected {body}");
        }

        let rejected = [
            serde_json::json!({ "query": query, "variables": { "c": "x" } }),
            serde_json::json!({ "query": query, "operationName": "Other" }),
            serde_json::json!({ "query": query, "extensions": {} }),
            serde_json::json!({ "query": 5 }),
            serde_json::json!({}),
            serde_json::json!([query]),
        ];
        for body in rejected {
            let result = parse_body(body.to_string().as_bytes());
            assert!(result.is_err(), "accepted {body}");
        }
        assert!(parse_body(b"query { x }").is_err());
    }

    #[test]
    fn request_debug_hides_secrets() {
        let query = client_query("get_auth_access_token", "code", "the-code");
        let text = format!("{:?}", parse_query(&query).unwrap());
        assert!(!text.contains("the-code"));
        assert!(!text.contains("abc123"));
    }
}
