-- A role and a database for the dynwf-ray journal. Change the password.
CREATE ROLE dynwf LOGIN PASSWORD 'change-me';
CREATE DATABASE dynwf OWNER dynwf;
