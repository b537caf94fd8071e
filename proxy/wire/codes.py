"""mongod's error codes, by the names mongod gives them (src/mongo/base/error_codes.yml).

Every error reply the proxy builds itself takes its code from here, so a code and its
codeName cannot drift apart. Numbered assertions that have no name in mongod
(`uassert(40323, ...)`) are answered as mongod does, with the codeName "Location<code>".
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """A code is its number (it compares and encodes as one); `code_name` is its name."""

    code_name: str

    def __new__(cls, number: int, code_name: str) -> Code:
        member = int.__new__(cls, number)
        member._value_ = number
        member.code_name = code_name
        return member

    INTERNAL_ERROR = 1, "InternalError"
    BAD_VALUE = 2, "BadValue"
    HOST_UNREACHABLE = 6, "HostUnreachable"
    FAILED_TO_PARSE = 9, "FailedToParse"
    UNAUTHORIZED = 13, "Unauthorized"
    TYPE_MISMATCH = 14, "TypeMismatch"
    ILLEGAL_OPERATION = 20, "IllegalOperation"
    NAMESPACE_NOT_FOUND = 26, "NamespaceNotFound"
    INDEX_NOT_FOUND = 27, "IndexNotFound"
    PATH_NOT_VIABLE = 28, "PathNotViable"
    CONFLICTING_UPDATE_OPERATORS = 40, "ConflictingUpdateOperators"
    NAMESPACE_EXISTS = 48, "NamespaceExists"
    DOLLAR_PREFIXED_FIELD_NAME = 52, "DollarPrefixedFieldName"
    DOTTED_FIELD_NAME = 55, "DottedFieldName"
    EMPTY_FIELD_NAME = 56, "EmptyFieldName"
    IMMUTABLE_FIELD = 66, "ImmutableField"
    INVALID_OPTIONS = 72, "InvalidOptions"
    INVALID_NAMESPACE = 73, "InvalidNamespace"
    OPERATION_FAILED = 96, "OperationFailed"
    WRITE_CONFLICT = 112, "WriteConflict"
    COMMAND_NOT_SUPPORTED = 115, "CommandNotSupported"
    CONFLICTING_OPERATION_IN_PROGRESS = 117, "ConflictingOperationInProgress"
    DOCUMENT_VALIDATION_FAILURE = 121, "DocumentValidationFailure"
    FAILED_TO_SATISFY_READ_PREFERENCE = 133, "FailedToSatisfyReadPreference"
    OPTION_NOT_SUPPORTED_ON_VIEW = 157, "OptionNotSupportedOnView"
    MAX_STALENESS_OUT_OF_RANGE = 160, "MaxStalenessOutOfRange"
    VIEW_DEPTH_LIMIT_EXCEEDED = 165, "ViewDepthLimitExceeded"
    COMMAND_NOT_SUPPORTED_ON_VIEW = 166, "CommandNotSupportedOnView"
    GRAPH_CONTAINS_CYCLE = 167, "GraphContainsCycle"
    INVALID_PIPELINE_OPERATOR = 168, "InvalidPipelineOperator"
    TRANSACTION_TOO_OLD = 225, "TransactionTooOld"
    NO_SUCH_TRANSACTION = 251, "NoSuchTransaction"
    TRANSACTION_COMMITTED = 256, "TransactionCommitted"
    INVALID_RESUME_TOKEN = 260, "InvalidResumeToken"
    OPERATION_NOT_SUPPORTED_IN_TRANSACTION = 263, "OperationNotSupportedInTransaction"
    CHANGE_STREAM_FATAL_ERROR = 280, "ChangeStreamFatalError"
    CHANGE_STREAM_HISTORY_LOST = 286, "ChangeStreamHistoryLost"
    NOT_WRITABLE_PRIMARY = 10107, "NotWritablePrimary"
    BSON_OBJECT_TOO_LARGE = 10334, "BSONObjectTooLarge"
    DUPLICATE_KEY = 11000, "DuplicateKey"
    INTERRUPTED_DUE_TO_REPL_STATE_CHANGE = 11602, "InterruptedDueToReplStateChange"
    # Numbered assertions without a name of their own.
    OUT_NEEDS_A_COLLECTION = 16994, "Location16994"
    STAGE_NEEDS_ONE_FIELD = 40323, "Location40323"
    UNRECOGNIZED_BULK_WRITE_OP = 40414, "Location40414"
    UNKNOWN_FIELD = 40415, "Location40415"
    OP_MSG_NEEDS_DB = 40571, "Location40571"
    MERGE_NOT_LAST = 40601, "Location40601"
    CHANGE_STREAM_NOT_FIRST = 40602, "Location40602"
    ONE_RESUME_OPTION = 40674, "Location40674"
    MERGE_INTO_NOT_A_COLLECTION = 51178, "Location51178"
    MERGE_NEEDS_INTO = 51182, "Location51182"


_BY_NUMBER = {int(code): code for code in Code}


def code_name(code: int) -> str:
    """mongod's name for a code: a known name, else "Location<code>"."""
    known = _BY_NUMBER.get(code)
    return known.code_name if known is not None else f"Location{code}"
